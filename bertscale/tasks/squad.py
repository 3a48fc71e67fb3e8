"""SQuAD v1.1 and v2.0 extractive question answering: the Task the trainer runs, and `answer`
for `bertscale predict`. Data, windows, post-processing and metrics live in the squad_* modules."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import write_json_atomic
from ..errors import UserError
from .base import EvalSet, Task, pad_batch
from .squad_data import load_examples
from .squad_features import build_features, prepare_eval_features, window_settings
from .squad_metric import squad_v1, squad_v2
from .squad_postprocess import Answer, postprocess


class SquadTask(Task):
    name = "squad"
    version_2 = False
    main_metric = "f1"
    greater_is_better = True
    default_max_seq_length = 384

    def model_class(self):
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering

    def label_names(self) -> tuple[str, ...]:
        return ("start_positions", "end_positions")

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        examples = _first(load_examples(self.run, "train", self.version_2), self.run.max_train_samples)
        return self._features(examples, training=True)

    def eval_set(self) -> Optional[EvalSet]:
        examples = load_examples(self.run, "validation", self.version_2)
        if examples is None:
            return None
        examples = _first(examples, self.run.max_eval_samples)
        return EvalSet(features=self._features(examples, training=False), examples=examples)

    def _features(self, examples, training: bool):
        return build_features(examples, self.tokenizer, training=training, workers=self.run.preprocessing_workers,
                              **window_settings(self.run, self.tokenizer, self.default_max_seq_length))

    def collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        # Eval rows also hold example_id and offset_mapping, which are for post-processing only.
        keep = set(self.model_input_names) | set(self.label_names())
        rows = [{k: v for k, v in row.items() if k in keep} for row in rows]
        return pad_batch(rows, self.tokenizer.pad_token_id, self.label_names())

    # --- evaluation --------------------------------------------------------------------------
    def eval_examples(self, eval_set: EvalSet) -> int:
        return len(eval_set.examples)  # questions: a long context spans several windows

    def eval_outputs(self, output, batch) -> dict[str, list]:
        return trimmed_logits(output, batch["attention_mask"])

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Optional[Path]) -> dict:
        # [:] turns a datasets Column into a list at once (iterating the Column formats row by row).
        ids, contexts, gold = (eval_set.examples[c][:] for c in ("id", "context", "answers"))
        answers = postprocess(
            ids, contexts, eval_set.features["example_id"][:], offset_rows(eval_set.features),
            outputs["start_logits"], outputs["end_logits"], **self._postprocess_settings())
        predictions = {qid: a.text for qid, a in answers.items()}
        references = {qid: answers_of["text"] for qid, answers_of in zip(ids, gold)}
        if self.version_2:
            null_odds = {qid: a.null_odds for qid, a in answers.items()}
            # The official script run with --na-prob-file null_odds.json and our threshold: its
            # thresholding then agrees with the '' predictions made above.
            metrics = squad_v2(predictions, references, null_odds, na_prob_thresh=self.run.null_score_diff_threshold)
            metrics["exact_match"] = metrics["exact"]
        else:
            metrics = squad_v1(predictions, references)
        if output_dir is not None:
            write_json_atomic(Path(output_dir) / "predictions.json", predictions)
            if self.version_2:
                write_json_atomic(Path(output_dir) / "null_odds.json", null_odds)
        return metrics

    def _postprocess_settings(self) -> dict:
        return dict(n_best_size=self.run.n_best_size, max_answer_length=self.run.max_answer_length,
                    version_2=self.version_2, null_score_diff_threshold=self.run.null_score_diff_threshold)


class SquadV2Task(SquadTask):
    name = "squad_v2"
    version_2 = True


def trimmed_logits(output, attention_mask: torch.Tensor) -> dict[str, list]:
    """Per-row start/end logits as float32 numpy, cut to each row's real (unpadded) length."""
    lengths = attention_mask.sum(dim=1).tolist()
    start = output.start_logits.detach().float().cpu().numpy()
    end = output.end_logits.detach().float().cpu().numpy()
    return {"start_logits": [start[i, :n] for i, n in enumerate(lengths)],
            "end_logits": [end[i, :n] for i, n in enumerate(lengths)]}


def _arrow_column(features, name: str):
    """One column of a datasets.Dataset as a pyarrow array, row selection applied. Reading it
    through python lists, or iterating a datasets Column, costs seconds on a full SQuAD set."""
    return features.select_columns([name]).with_format("arrow")[:][name].combine_chunks()


def offset_rows(features) -> list[np.ndarray]:
    """The offset_mapping column as one (tokens, 2) array per row."""
    import pyarrow.compute as pc

    column = _arrow_column(features, "offset_mapping")
    pairs = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, 2)
    bounds = np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    return np.split(pairs, bounds[:-1])


def _first(examples, n: Optional[int]):
    return examples.select(range(min(n, len(examples)))) if n is not None else examples


def answer(model, tokenizer, question: str, context: str, run) -> tuple[str, float]:
    """Answer one question about one context with a plain torch model: the same windows and
    post-processing as evaluation. Returns (answer text, probability among the n-best answers);
    for squad_v2 the text is '' when the model says the context holds no answer."""
    if not question.strip() or not context.strip():
        raise UserError("predict: both a question and a context are needed.")
    task = TASKS.get(run.task, SquadTask)(run, tokenizer)
    examples = {"id": ["q"], "question": [question], "context": [context]}
    window = window_settings(run, tokenizer, task.default_max_seq_length)
    features = prepare_eval_features(examples, tokenizer, **window)
    rows = [dict(zip(features, values)) for values in zip(*features.values())]
    batch = task.collate(rows)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(**{k: v.to(device) for k, v in batch.items() if k in task.model_input_names})
    logits = trimmed_logits(output, batch["attention_mask"])
    result: Answer = postprocess(["q"], [context], features["example_id"], features["offset_mapping"],
                                 logits["start_logits"], logits["end_logits"], **task._postprocess_settings())["q"]
    return result.text, result.probability


TASKS = {"squad": SquadTask, "squad_v2": SquadV2Task}

"""SQuAD v1.1 and v2.0 extractive question answering: the Task the trainer runs, and `answer`
for `bertscale predict`. Data, windows, post-processing and metrics live in the squad_* modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..args import EVAL, opt
from ..errors import UserError
from ..files import write_json_atomic
from . import register
from .base import EvalSet, Task, first_rows, pad_batch
from .squad_data import load_examples
from .squad_features import build_features, prepare_eval_features, window_settings
from .squad_metric import squad_v1, squad_v2
from .squad_postprocess import Answer, postprocess

SQUAD_V11_TRAIN_FEATURES = 88_524  # SQuAD v1.1 train at seq 384, stride 128, BERT WordPiece


@dataclass
class SquadArgs:
    doc_stride: int = opt(128, "SQuAD: overlap between context windows.", commands=EVAL)
    max_query_length: int = opt(64, "SQuAD: question tokens kept.", commands=EVAL)
    n_best_size: int = opt(20, "SQuAD: start/end candidates per window in post-processing.", commands=EVAL)
    max_answer_length: int = opt(30, "SQuAD: longest answer in tokens.", commands=EVAL)
    null_score_diff_threshold: float = opt(
        0.0, "SQuAD v2: predict no-answer when null score - best > this.", commands=EVAL
    )


@dataclass
class SquadPredict:
    question: str | None = opt(None, "SQuAD models: the question.", commands=("predict",))
    context: str | None = opt(None, "SQuAD models: the passage to find the answer in.", commands=("predict",))
    squad_v2: bool = opt(
        False,
        "SQuAD models: may answer '' (no answer) as SQuAD v2.0 models do (default: as the model was trained).",
        commands=("predict",),
    )


@register
class SquadTask(Task):
    names = ("squad",)
    is_default = True
    title = "SQuAD"
    Args = SquadArgs
    Predict = SquadPredict
    architectures = ("ForQuestionAnswering",)
    output_files = ("predictions.json",)
    plan_model_class = "BertForQuestionAnswering"
    plan_head = "span"
    plan_rows_per_epoch = SQUAD_V11_TRAIN_FEATURES
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
        examples = first_rows(load_examples(self.data, "train", self.version_2), self.data.max_train_samples)
        self._train_questions = len(examples)
        return self._features(examples, training=True)

    def describe_train_data(self, rows: int) -> str:
        source = f"--train-file {self.data.train_file}" if self.data.train_file else f"--task {self.name}"
        return f"{source}: {getattr(self, '_train_questions', '?')} questions, {rows} training windows"

    def eval_set(self) -> EvalSet | None:
        examples = load_examples(self.data, "validation", self.version_2)
        if examples is None:
            return None
        examples = first_rows(examples, self.data.max_eval_samples)
        return EvalSet(features=self._features(examples, training=False), examples=examples)

    def window(self) -> dict:
        return window_settings(self.max_seq_length, self.args, self.tokenizer)

    def _features(self, examples, training: bool):
        return build_features(
            examples, self.tokenizer, training=training, workers=self.data.preprocessing_workers, **self.window()
        )

    def collate(self, rows: list[dict]) -> dict:
        # Eval rows also hold example_id and offset_mapping, which are for post-processing only.
        keep = set(self.model_input_names) | set(self.label_names())
        rows = [{k: v for k, v in row.items() if k in keep} for row in rows]
        return pad_batch(rows, self.tokenizer.pad_token_id, self.label_names())

    # --- training ----------------------------------------------------------------------------
    def loss(self, output, inputs):
        """The span loss with each row's softmax over its real positions, in both --unpad and
        --no-unpad. Stock BertForQuestionAnswering's softmax also covers the padded positions, so its
        loss and gradient change with how much padding a batch happens to have, and part of the
        gradient goes to pushing padded logits down (docs/unpadding.md)."""
        if self.packing is not None:
            return output.loss  # the unpadded model's own loss is this one already
        from ..unpad import PADDING_LOGIT
        from ..unpad.losses import span_loss

        padded = inputs["attention_mask"] == 0
        start, end = (logits.masked_fill(padded, PADDING_LOGIT) for logits in (output.start_logits, output.end_logits))
        return span_loss(start, end, inputs["start_positions"], inputs["end_positions"])

    # --- evaluation --------------------------------------------------------------------------
    def eval_examples(self, eval_set: EvalSet) -> int:
        return len(eval_set.examples)  # questions: a long context spans several windows

    def eval_outputs(self, output, batch) -> dict[str, list]:
        return trimmed_logits(output, batch["attention_mask"])

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Path | None) -> dict:
        # [:] turns a datasets Column into a list at once (iterating the Column formats row by row).
        ids, contexts, gold = (eval_set.examples[c][:] for c in ("id", "context", "answers"))
        answers = postprocess(
            ids,
            contexts,
            eval_set.features["example_id"][:],
            offset_rows(eval_set.features),
            outputs["start_logits"],
            outputs["end_logits"],
            **self._postprocess_settings(),
        )
        predictions = {qid: a.text for qid, a in answers.items()}
        references = {qid: answers_of["text"] for qid, answers_of in zip(ids, gold)}
        if self.version_2:
            null_odds = {qid: a.null_odds for qid, a in answers.items()}
            # The official script run with --na-prob-file null_odds.json and our threshold: its
            # thresholding then agrees with the '' predictions made above.
            metrics = squad_v2(predictions, references, null_odds, na_prob_thresh=self.args.null_score_diff_threshold)
            metrics["exact_match"] = metrics["exact"]
        else:
            metrics = squad_v1(predictions, references)
        if output_dir is not None:
            write_json_atomic(Path(output_dir) / "predictions.json", predictions)
            if self.version_2:
                write_json_atomic(Path(output_dir) / "null_odds.json", null_odds)
        return metrics

    def _postprocess_settings(self) -> dict:
        return dict(
            n_best_size=self.args.n_best_size,
            max_answer_length=self.args.max_answer_length,
            version_2=self.version_2,
            null_score_diff_threshold=self.args.null_score_diff_threshold,
        )

    # --- predict -----------------------------------------------------------------------------
    @classmethod
    def predict(cls, model_dir: str, inputs: SquadPredict, max_seq_length: int) -> str:
        if not (inputs.question and inputs.context):
            raise UserError(f"{model_dir} is a question-answering model: pass --question and --context")
        import torch
        from transformers import AutoModelForQuestionAnswering

        from ..args import DataArgs
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        task = (SquadV2Task if inputs.squad_v2 else cls)(tokenizer, data=DataArgs(max_seq_length=max_seq_length))
        model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
        with torch.no_grad():
            text, score = answer(model, tokenizer, inputs.question, inputs.context, task)
        return f"answer: {text!r}  score: {score:.3f}"


@register
class SquadV2Task(SquadTask):
    names = ("squad_v2",)
    is_default = False
    output_files = ("predictions.json", "null_odds.json")
    version_2 = True


def trimmed_logits(output, attention_mask) -> dict[str, list]:
    """Per-row start/end logits as float32 numpy, cut to each row's real (unpadded) length."""
    lengths = attention_mask.sum(dim=1).tolist()
    start = output.start_logits.detach().float().cpu().numpy()
    end = output.end_logits.detach().float().cpu().numpy()
    return {
        "start_logits": [start[i, :n] for i, n in enumerate(lengths)],
        "end_logits": [end[i, :n] for i, n in enumerate(lengths)],
    }


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


def answer(model, tokenizer, question: str, context: str, task: SquadTask) -> tuple[str, float]:
    """Answer one question about one context with a plain torch model: the same windows and
    post-processing as evaluation (`task`'s settings). Returns (answer text, probability among the
    n-best answers); for squad_v2 the text is '' when the model says the context holds no answer."""
    import torch

    if not question.strip() or not context.strip():
        raise UserError("predict: both a question and a context are needed.")
    examples = {"id": ["q"], "question": [question], "context": [context]}
    features = prepare_eval_features(examples, tokenizer, **task.window())
    rows = [dict(zip(features, values)) for values in zip(*features.values())]
    batch = task.collate(rows)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model(**{k: v.to(device) for k, v in batch.items() if k in task.model_input_names})
    logits = trimmed_logits(output, batch["attention_mask"])
    result: Answer = postprocess(
        ["q"],
        [context],
        features["example_id"],
        features["offset_mapping"],
        logits["start_logits"],
        logits["end_logits"],
        **task._postprocess_settings(),
    )["q"]
    return result.text, result.probability

"""Your own task in one file: sentence-pair regression (STS-B style), a head bertscale does not ship.

A BERT reads two sentences and predicts one real number (a similarity score, a rating); the loss is
the mean squared error, the metrics MSE, Pearson and Spearman. Everything bertscale needs to train,
evaluate, predict and export it is in this class: no file of bertscale changes.

    deepspeed bertscale/cli.py finetune --task examples/pair_regression.py:PairRegression \\
        --model bert-base-uncased --train-file train.csv --eval-file dev.csv --output-dir runs/sts
    bertscale predict --model runs/sts/final --text "A man plays a guitar." --text-pair "Someone plays music."
    bertscale evaluate --model runs/sts/final --eval-file dev.csv      # the task is recorded in the model

Data: CSV, TSV or JSON lines with two text columns and a numeric score column (flags below). The
same --task works under torchrun and in the Slurm scripts (TASK=examples/pair_regression.py:PairRegression).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bertscale.args import EVAL, opt
from bertscale.errors import UserError
from bertscale.tasks.base import EvalSet, Task, first_rows


@dataclass
class PairRegressionArgs:
    """This task's flags: they appear in `bertscale finetune --task ...:PairRegression --help`."""

    text_column: str = opt("sentence1", "Pair regression: column with the first text.", commands=EVAL)
    text_pair_column: str = opt("sentence2", "Pair regression: column with the second text.", commands=EVAL)
    score_column: str = opt("score", "Pair regression: column with the number to predict.", commands=EVAL)


@dataclass
class PairRegressionPredict:
    text: str | None = opt(None, "Pair regression: the first text.", commands=("predict",))
    text_pair: str | None = opt(None, "Pair regression: the second text.", commands=("predict",))


class PairRegression(Task):
    names = ("pair-regression",)
    title = "Sentence-pair regression (examples/pair_regression.py)"
    Args = PairRegressionArgs
    Predict = PairRegressionPredict
    output_files = ("predictions.jsonl",)
    metrics = ("mse", "pearson", "spearman")
    main_metric = "pearson"
    greater_is_better = True

    # --- model: BERT with one linear output, trained with MSE -----------------------------------
    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_config_overrides(self) -> dict:
        return {"num_labels": 1, "problem_type": "regression"}

    def higher_is_better(self, metric: str) -> bool:
        return metric != "mse"

    # --- data: a table of (text, text pair, score) rows ------------------------------------------
    def train_features(self):
        if not self.data.train_file:
            raise UserError(f"--task {self.name} needs --train-file (CSV, TSV or JSON lines)")
        return self._encode(first_rows(self._table(self.data.train_file), self.data.max_train_samples))

    def eval_set(self) -> EvalSet | None:
        if not self.data.eval_file:
            return None
        table = first_rows(self._table(self.data.eval_file), self.data.max_eval_samples)
        texts = list(zip(table[self.args.text_column], table[self.args.text_pair_column]))
        return EvalSet(features=self._encode(table), examples=texts)

    def _table(self, path: str):
        from datasets import load_dataset

        suffix = Path(path).suffix.lower()
        kinds = {
            ".csv": ("csv", {}),
            ".tsv": ("csv", {"delimiter": "\t"}),
            ".jsonl": ("json", {}),
            ".json": ("json", {}),
        }
        if suffix not in kinds or not Path(path).is_file():
            raise UserError(f"{path}: expected an existing .csv, .tsv or .jsonl file")
        kind, options = kinds[suffix]
        table = load_dataset(kind, data_files=path, split="train", **options)
        wanted = [self.args.text_column, self.args.text_pair_column, self.args.score_column]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            raise UserError(
                f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)}); name the "
                "columns with --text-column, --text-pair-column, --score-column"
            )
        return table

    def _encode(self, table):
        args, tokenizer, max_length = self.args, self.tokenizer, self.max_seq_length

        def encode(batch):
            encoded = dict(
                tokenizer(batch[args.text_column], batch[args.text_pair_column], truncation=True, max_length=max_length)
            )
            encoded["labels"] = [float(s) for s in batch[args.score_column]]
            return encoded

        return table.map(encode, batched=True, remove_columns=table.column_names, desc="Tokenising pairs")

    # --- evaluation ----------------------------------------------------------------------------
    def eval_outputs(self, output, batch) -> dict[str, list]:
        return {"prediction": output.logits[:, 0].float().cpu().tolist(), "score": batch["labels"].cpu().tolist()}

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Path | None) -> dict:
        pred, gold = np.asarray(outputs["prediction"]), np.asarray(outputs["score"])
        metrics = {
            "mse": float(np.mean((pred - gold) ** 2)),
            "pearson": _correlation(pred, gold),
            "spearman": _correlation(_ranks(pred), _ranks(gold)),
        }
        if output_dir is not None:
            with open(Path(output_dir) / "predictions.jsonl", "w") as f:
                for (text, pair), p, g in zip(eval_set.examples, pred, gold):
                    f.write(
                        json.dumps({"text": text, "text_pair": pair, "prediction": float(p), "score": float(g)}) + "\n"
                    )
        return metrics

    # --- predict -------------------------------------------------------------------------------
    @classmethod
    def predict(cls, model_dir: str, inputs: PairRegressionPredict, max_seq_length: int) -> str:
        if not (inputs.text and inputs.text_pair):
            raise UserError("pair regression: pass --text and --text-pair")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        encoded = tokenizer(
            inputs.text, inputs.text_pair, truncation=True, max_length=max_seq_length, return_tensors="pt"
        )
        with torch.no_grad():
            return f"score: {model(**encoded).logits[0, 0].item():.4f}"


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])

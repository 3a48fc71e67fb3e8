"""Text classification of single sentences or sentence pairs: `--task classify` and `glue:NAME`.

Data comes from local CSV/TSV/JSON(L) files (--train-file, --eval-file) or from a hub dataset
(--dataset; `glue:NAME` defaults to nyu-mll/glue with config NAME). The label map goes into the
model config, so an exported model carries it: label names in the hub's ClassLabel order, else
sorted (numeric labels in numeric order). Without training data (evaluate, predict) the map comes
from the trained model's config, passed in as `id2label`.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import hub
from ..args import EVAL, opt
from ..errors import UserError, first_line
from . import register
from .base import EvalSet, Task, first_rows
from .classify_metrics import METRICS, classification_metrics, softmax, write_predictions

GLUE_HUB = "nyu-mll/glue"
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True)
class GlueSpec:
    """Columns to look for (the hub's names first, then those in GLUE's own TSV files)."""

    text: tuple[str, ...]
    pair: tuple[str, ...] = ()
    label: tuple[str, ...] = ("label",)
    main_metric: str = "accuracy"
    eval_split: str = "validation"


GLUE = {
    "sst2": GlueSpec(text=("sentence",)),
    "cola": GlueSpec(text=("sentence",)),
    "mrpc": GlueSpec(
        text=("sentence1", "#1 String"), pair=("sentence2", "#2 String"), label=("label", "Quality"), main_metric="f1"
    ),
    "rte": GlueSpec(text=("sentence1",), pair=("sentence2",)),
    "qnli": GlueSpec(text=("question",), pair=("sentence",)),
    "qqp": GlueSpec(text=("question1",), pair=("question2",), label=("label", "is_duplicate"), main_metric="f1"),
    "mnli": GlueSpec(
        text=("premise", "sentence1"),
        pair=("hypothesis", "sentence2"),
        label=("label", "gold_label"),
        eval_split="validation_matched",
    ),
}


@dataclass
class ClassifyArgs:
    text_column: str | None = opt(None, "Classify: column with the text (default: sentence/text).", commands=EVAL)
    text_pair_column: str | None = opt(None, "Classify: column with the second text of a pair.", commands=EVAL)
    label_column: str | None = opt(None, "Classify: column with the label (default: label).", commands=EVAL)


@dataclass
class ClassifyPredict:
    text: str | None = opt(None, "Classification models: the text.", commands=("predict",))
    text_pair: str | None = opt(None, "Classification models: the second text of a pair.", commands=("predict",))


@dataclass(frozen=True)
class Columns:
    text: str
    pair: str | None
    label: str


@dataclass
class Split:
    """Raw examples of one split, where they came from (for messages) and which columns to use."""

    data: Any  # datasets.Dataset
    where: str
    columns: Columns


@dataclass
class EvalTexts:
    """What predictions.jsonl shows next to each prediction."""

    texts: list[str]
    pairs: list[str] | None


@register
class ClassifyTask(Task):
    names = ("classify", "glue:*")
    title = "Classification"
    Args = ClassifyArgs
    Predict = ClassifyPredict
    architectures = ("ForSequenceClassification",)
    output_files = ("predictions.jsonl",)
    plan_model_class = "BertForSequenceClassification"
    plan_head = "pooled"
    metrics = METRICS
    main_metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer, id2label: Mapping | None = None, **settings):
        """`id2label`: the label map of an already trained model (its config's id2label). Give it when
        evaluating or predicting; leave it out when fine-tuning, where the training data decides."""
        name = settings.get("name") or "classify"
        self.glue_name = glue_name(name)
        self.glue = GLUE[self.glue_name] if self.glue_name else None
        self.main_metric = self.glue.main_metric if self.glue else "accuracy"
        super().__init__(tokenizer, **{**settings, "name": name})
        self._labels = self._checked(labels_from_id2label(id2label), "the model's id2label") if id2label else None
        self._splits: dict[str, Split | None] = {}

    @classmethod
    def matches(cls, name: str) -> bool:
        if not super().matches(name):
            return False
        glue_name(name)  # an unknown glue:NAME is refused here, with the names that exist
        return True

    @classmethod
    def predict(cls, model_dir: str, inputs: ClassifyPredict, max_seq_length: int) -> str:
        return predict_one(model_dir, inputs)

    @classmethod
    def for_model(cls, tokenizer, model_config, **settings) -> ClassifyTask:
        return cls(tokenizer, id2label=model_config.id2label, **settings)

    # --- labels and model --------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """Label names in id order."""
        if self._labels is None:
            split = self._split("train")
            if split is None:
                raise UserError(
                    f"--task {self.name}: no training data to take the labels from; pass "
                    "--train-file or --dataset, or evaluate a model trained by bertscale "
                    "(its config holds the label map)"
                )
            names = class_names(split.data, split.columns.label)
            if names is None:
                names = sort_labels({str(v) for v in split.data[split.columns.label]})
            self._labels = self._checked(names, split.where)
        return self._labels

    def _checked(self, labels: list[str], where: str) -> list[str]:
        if len(labels) < 2:
            raise UserError(f"{where}: only the label {labels!r}; a classifier needs at least two")
        if self.main_metric == "f1" and len(labels) != 2:
            raise UserError(
                f"{where}: metric f1 needs two labels, found {len(labels)}; use --metric-for-best macro_f1 or accuracy"
            )
        return labels

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_config_overrides(self) -> dict:
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    # --- data --------------------------------------------------------------------------------
    def train_features(self):
        split = self._split("train")
        if split is None:
            raise UserError(f"--task {self.name} needs training data: pass --train-file or --dataset")
        return self._encode(split, first_rows(split.data, self.data.max_train_samples))

    def describe_train_data(self, rows: int) -> str:
        split = self._split("train")
        return f"{split.where if split else '--task ' + self.name}: {rows} training rows"

    def eval_set(self) -> EvalSet | None:
        split = self._split("eval")
        if split is None:
            return None
        data = first_rows(split.data, self.data.max_eval_samples)
        pair = split.columns.pair
        texts = EvalTexts(list(data[split.columns.text]), list(data[pair]) if pair else None)
        return EvalSet(features=self._encode(split, data), examples=texts)

    def _split(self, which: str) -> Split | None:
        if which not in self._splits:
            self._splits[which] = self._load_split(which)
        return self._splits[which]

    def _load_split(self, which: str) -> Split | None:
        path = self.data.train_file if which == "train" else self.data.eval_file
        if path:
            data, where = load_table(path), path
        elif self.data.dataset or self.glue:
            name = self.data.dataset or GLUE_HUB
            config = self.data.dataset_config or self.glue_name
            split = "train" if which == "train" else (self.glue.eval_split if self.glue else "validation")
            data, where = load_hub_split(name, config, split)
        else:
            return None
        return Split(data, where, find_columns(data.column_names, where, self.args, self.glue))

    def _encode(self, split: Split, data):
        """Tokenise in batches (cached by datasets) into model inputs plus `labels` ids."""
        label2id = {name: i for i, name in enumerate(self.labels)}
        names = class_names(data, split.columns.label)
        unknown = sorted({label_name(v, names) for v in data[split.columns.label]} - label2id.keys())
        if unknown:
            raise UserError(
                f"{split.where}: label(s) {', '.join(map(repr, unknown[:5]))} not among the labels "
                f"the model knows ({', '.join(self.labels)}); fix the file or train on data that "
                "has them"
            )
        workers = self.data.preprocessing_workers
        return data.map(
            encode_batch,
            batched=True,
            remove_columns=data.column_names,
            num_proc=workers if workers > 1 else None,
            desc=f"Tokenising {split.where}",
            fn_kwargs=dict(
                tokenizer=self.tokenizer,
                columns=split.columns,
                max_length=self.max_seq_length,
                label2id=label2id,
                names=names,
            ),
        )

    # --- eval --------------------------------------------------------------------------------
    def eval_outputs(self, output, batch) -> dict[str, list]:
        return {"logits": list(output.logits.detach().float().cpu().numpy()), "labels": batch["labels"].cpu().tolist()}

    def compute_metrics(self, eval_set: EvalSet, outputs: dict[str, list], output_dir: Path | None) -> dict:
        probs = softmax(np.stack(outputs["logits"]))
        y_true = np.asarray(outputs["labels"])
        metrics = classification_metrics(y_true, probs.argmax(axis=-1), self.labels)
        if output_dir is not None:
            texts = eval_set.examples
            write_predictions(
                Path(output_dir) / "predictions.jsonl", texts.texts, texts.pairs, y_true, probs, self.labels
            )
        return metrics


# --- helpers ---------------------------------------------------------------------------------
def glue_name(task: str) -> str | None:
    """'sst2' for 'glue:sst2', None for tasks that are not GLUE shortcuts."""
    if not task.startswith("glue:"):
        return None
    name = task[len("glue:") :]
    if name not in GLUE:
        raise UserError(
            f"--task {task}: unknown GLUE task; choose one of "
            f"{', '.join('glue:' + n for n in GLUE)}, or --task classify with your own data"
        )
    return name


def labels_from_id2label(id2label: Mapping) -> list[str]:
    """A config's id2label (int or str keys, as JSON leaves them) as names in id order."""
    by_id = {int(i): str(name) for i, name in id2label.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"the model's id2label has ids {sorted(by_id)}; expected 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def sort_labels(names) -> list[str]:
    """Sorted label names; numeric ones in numeric order ('2' before '10')."""
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def class_names(data, column: str) -> list[str] | None:
    """The names of a hub ClassLabel column (its ids are indices into them), else None."""
    from datasets import ClassLabel

    feature = data.features[column]
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def label_name(value, names: list[str] | None) -> str:
    # ClassLabel -1 (unlabelled hub test splits) stays '-1' so that it is reported as unknown.
    if names is not None and 0 <= value < len(names):
        return names[value]
    return str(value)


def encode_batch(batch, tokenizer, columns: Columns, max_length: int, label2id: dict, names) -> dict:
    pairs = batch[columns.pair] if columns.pair else None
    encoded = dict(tokenizer(batch[columns.text], pairs, truncation=True, max_length=max_length))
    encoded["labels"] = [label2id[label_name(v, names)] for v in batch[columns.label]]
    return encoded


def find_columns(found: Sequence[str], where: str, args: ClassifyArgs, glue: GlueSpec | None) -> Columns:
    """Text, pair and label columns: the flags' names if given, else the GLUE task's or the defaults
    (sentence/text; sentence1 + sentence2 as a pair; label). A pair is only guessed along with the text."""
    listing = ", ".join(found)

    def given(name: str, flag: str) -> str:
        if name not in found:
            raise UserError(f"{where}: no column {name!r} ({flag}); columns found: {listing}")
        return name

    def first(candidates: Sequence[str], flag: str) -> str:
        for name in candidates:
            if name in found:
                return name
        raise UserError(
            f"{where}: no column {' or '.join(map(repr, candidates))}; columns found: {listing}. "
            f"Name the column with {flag}"
        )

    text_names, pair_names = (glue.text, glue.pair) if glue else (("sentence", "text"), ())
    if not glue and "sentence1" in found and "sentence2" in found:
        text_names, pair_names = ("sentence1",), ("sentence2",)
    text = given(args.text_column, "--text-column") if args.text_column else first(text_names, "--text-column")
    if args.text_pair_column:
        pair = given(args.text_pair_column, "--text-pair-column")
    elif pair_names and not args.text_column:
        pair = first(pair_names, "--text-pair-column")
    else:
        pair = None
    label_names = glue.label if glue else ("label",)
    label = given(args.label_column, "--label-column") if args.label_column else first(label_names, "--label-column")
    return Columns(text, pair, label)


def load_table(path: str):
    """A local CSV, TSV or JSON(L) file as a datasets.Dataset (cached by datasets).

    TSV is split on tabs only, with no quoting (GLUE's files hold bare quotes). CSV/TSV columns are
    all read as text: pandas would otherwise turn a label '1' into an int and 'NA' into a missing value.
    """
    from datasets import Features, Value, load_dataset
    from datasets.exceptions import DatasetGenerationError

    p = Path(path)
    kind = p.suffix.lower()
    if kind not in TABLE_SUFFIXES:
        raise UserError(f"{path}: unknown file type; classification reads {', '.join(TABLE_SUFFIXES)}")
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    tabular = kind in (".csv", ".tsv")
    lines = count_nonblank_lines(p, stop=2)
    if lines == 0 or (tabular and lines < 2):
        raise UserError(f"{path}: the file is empty" + (" (a header but no rows)" if lines else ""))
    try:
        if not tabular:
            data = load_dataset("json", data_files=str(p), split="train")
        else:
            delimiter = "\t" if kind == ".tsv" else ","
            header = read_header(p, delimiter)
            data = load_dataset(
                "csv",
                data_files=str(p),
                split="train",
                delimiter=delimiter,
                quoting=csv.QUOTE_NONE if kind == ".tsv" else csv.QUOTE_MINIMAL,
                keep_default_na=False,
                features=Features({c: Value("string") for c in header}),
            )
    except DatasetGenerationError as e:
        raise UserError(f"{path}: cannot read it as {kind[1:].upper()} ({first_line(e.__cause__ or e)})") from None
    if len(data) == 0:
        raise UserError(f"{path}: the file has no rows")
    return data


def load_hub_split(name: str, config: str | None, split: str):
    where = f"{name}" + (f" ({config})" if config else "") + f" split '{split}'"
    return hub.load_split(name, config, split, hint="For local data pass --train-file / --eval-file."), where


def count_nonblank_lines(path: Path, stop: int) -> int:
    """Non-blank lines in the file, counting no further than `stop` (cheap on big files)."""
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            n += bool(line.strip())
            if n >= stop:
                break
    return n


def read_header(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline().rstrip("\r\n")
    return first.split("\t") if delimiter == "\t" else next(csv.reader([first]))


# --- predict -----------------------------------------------------------------------------------
@torch.no_grad()
def predict_texts(
    model, tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None = None, batch_size: int = 32
) -> list[tuple[str, float]]:
    """(label name, probability) of the most likely label for each text (or text pair), with the
    label names of the model's config. A plain torch model on any device, no DeepSpeed."""
    if text_pairs and len(text_pairs) != len(texts):
        raise UserError(f"{len(texts)} --text but {len(text_pairs)} --text-pair; give one pair per text")
    model.eval()
    device = next(model.parameters()).device
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        pairs = list(text_pairs[start : start + batch_size]) if text_pairs else None
        inputs = tokenizer(chunk, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(
            device
        )
        probs, ids = model(**inputs).logits.float().softmax(dim=-1).max(dim=-1)
        results += [(model.config.id2label[int(i)], float(p)) for i, p in zip(ids, probs)]
    return results


def predict_one(model_dir: str, inputs: ClassifyPredict) -> str:
    if not inputs.text:
        raise UserError(f"{model_dir} is a classification model: pass --text (and --text-pair for pairs)")
    from transformers import AutoModelForSequenceClassification

    from ..models import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    pairs = [inputs.text_pair] if inputs.text_pair else None
    label, prob = predict_texts(model, load_tokenizer(model_dir), [inputs.text], pairs)[0]
    return f"label: {label}  probability: {prob:.3f}"

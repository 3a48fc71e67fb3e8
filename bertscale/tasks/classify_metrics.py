"""Classification metrics and the predictions file, computed from gathered logits and label ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "macro_f1", "f1")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, the positive class's F1 (id 1) for two labels, and the confusion matrix
    (rows: true label, columns: predicted label, both in id order).

    Macro-F1 averages over the labels that occur among the true or predicted labels (as
    scikit-learn does), so a small eval set that lacks a class is not scored zero for it.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"need as many predictions as labels, and at least one: {len(y_pred)} vs {len(y_true)}")
    n = len(label_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    hits = np.diag(confusion)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (row total + column total)
    support = confusion.sum(axis=1) + confusion.sum(axis=0)
    f1 = np.divide(2 * hits, support, out=np.zeros(n), where=support > 0)
    metrics = {
        "accuracy": float(hits.sum() / len(y_true)),
        "macro_f1": float(f1[support > 0].mean()),
    }
    if n == 2:
        metrics["f1"] = float(f1[1])
    metrics["confusion_matrix"] = confusion.tolist()
    metrics["labels"] = list(label_names)
    return metrics


def write_predictions(
    path: Path,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None,
    y_true: Sequence[int],
    probs: np.ndarray,
    label_names: Sequence[str],
) -> None:
    """One JSON line per example: index, text(s), true and predicted label, its probability."""
    pred = probs.argmax(axis=-1)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            row = {"index": i, "text": text}
            if text_pairs is not None:
                row["text_pair"] = text_pairs[i]
            row.update(
                label=label_names[y_true[i]],
                prediction=label_names[pred[i]],
                probability=round(float(probs[i, pred[i]]), 6),
            )
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

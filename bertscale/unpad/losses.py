"""The stock heads' losses, written once for the unpadded models (same formulas as transformers')."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def span_loss(start_logits, end_logits, start_positions, end_positions) -> torch.Tensor:
    """BertForQuestionAnswering's loss: mean of the start and end cross-entropies over [batch, seq];
    positions outside the sequence are clamped to seq and ignored."""
    ignored_index = start_logits.size(1)
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    start_positions, end_positions = start_positions.clamp(0, ignored_index), end_positions.clamp(0, ignored_index)
    start_loss = F.cross_entropy(start_logits, start_positions, ignore_index=ignored_index)
    end_loss = F.cross_entropy(end_logits, end_positions, ignore_index=ignored_index)
    return (start_loss + end_loss) / 2


def sequence_classification_loss(config, num_labels: int, logits, labels) -> torch.Tensor:
    """BertForSequenceClassification's loss, including how it sets config.problem_type on first use."""
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels)
    raise ValueError(f"config.problem_type={config.problem_type!r} is not one transformers knows")


def masked_lm_loss(prediction_logits, masked_labels) -> torch.Tensor:
    """Mean cross-entropy over the scored tokens, as the stock MLM loss; 0 (not NaN) without any."""
    total = F.cross_entropy(prediction_logits.float(), masked_labels, reduction="sum")
    return total / max(masked_labels.shape[0], 1)

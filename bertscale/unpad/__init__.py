"""Unpadded BERT: after the embeddings a batch's real tokens are packed into one [tokens, hidden]
tensor, every Linear, LayerNorm, GELU and dropout runs on real tokens only, and attention uses
variable-length kernels fed with cu_seqlens / max_seqlen.

    packing.py    where the real tokens are (Packing), and packing_kwargs for collators
    attention.py  varlen attention kernels per device, and which ones apply attention dropout
    encoder.py    the stock embeddings and layers run on packed tokens
    losses.py     the stock heads' losses
    models.py     Unpadded* heads (subclasses of the stock ones) and unpadded_class()
"""

from .attention import describe_backend
from .models import (
    PADDING_LOGIT,
    UnpaddedBertForPreTraining,
    UnpaddedBertForQuestionAnswering,
    UnpaddedBertForSequenceClassification,
    stock_class,
    unpadded_class,
)
from .packing import PACKING_KEYS, Packing, packing_kwargs

__all__ = [
    "PACKING_KEYS",
    "PADDING_LOGIT",
    "Packing",
    "UnpaddedBertForPreTraining",
    "UnpaddedBertForQuestionAnswering",
    "UnpaddedBertForSequenceClassification",
    "describe_backend",
    "packing_kwargs",
    "stock_class",
    "unpadded_class",
]

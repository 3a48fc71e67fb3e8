"""Unpadded BERT: after the embeddings a batch's real tokens are packed into one [tokens, hidden]
tensor, every Linear, LayerNorm, GELU and dropout runs on real tokens only, and attention uses
variable-length kernels fed with cu_seqlens / max_seqlen.

    packing.py    where the real tokens are (Packing), and add_packing / packing_kwargs for collators
    attention.py  varlen attention kernels per device, and which ones apply attention dropout
    cpu_kernels.py  the CPU ones: attention row by row, its dropout mask over the padded grid
    encoder.py    the stock embeddings and layers run on packed tokens (packed_dropout)
    losses.py     the stock heads' losses
    models.py     Unpadded* heads (subclasses of the stock ones), unpadded_class(), packing_options()
"""

from .attention import describe_backend
from .models import (
    PADDING_LOGIT,
    UnpaddedBertForPreTraining,
    UnpaddedBertForQuestionAnswering,
    UnpaddedBertForSequenceClassification,
    packing_options,
    stock_class,
    unpadded_class,
)
from .packing import PACKING_KEYS, Packing, add_packing, packing_kwargs

__all__ = [
    "PACKING_KEYS",
    "PADDING_LOGIT",
    "Packing",
    "UnpaddedBertForPreTraining",
    "UnpaddedBertForQuestionAnswering",
    "UnpaddedBertForSequenceClassification",
    "add_packing",
    "describe_backend",
    "packing_kwargs",
    "packing_options",
    "stock_class",
    "unpadded_class",
]

"""Where a padded [batch, seq] batch's real tokens are, and moving tensors between the two layouts.

Packed layout: the real tokens of every row, row after row, as one [tokens, ...] tensor. A row's
tokens keep their order, so `indices` (flat positions into [batch * seq]) are increasing and row b
owns packed tokens cu_seqlens[b]:cu_seqlens[b + 1]; its first one is the [CLS] token when the
batch is right-padded (as bertscale's collate pads). Every row must hold at least one real token.

Collators call `add_packing` (or `packing_kwargs`) on the CPU, so the model gets `max_seqlen` as a
Python int and the indices ready-made: no device-to-host sync in the step. A model given only
attention_mask computes the same with `Packing.from_mask` (a sync or two on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tasks.masking import IGNORE_INDEX

# Keyword arguments that packing_kwargs adds to a batch; max_seqlen is an int, not a tensor.
PACKING_KEYS = ("indices", "cu_seqlens", "max_seqlen", "masked_indices")


@dataclass
class Packing:
    """Where the real tokens of a padded [batch_size, seq_len] batch are."""

    indices: torch.Tensor  # [tokens] int64: flat positions of real tokens in [batch_size * seq_len]
    cu_seqlens: torch.Tensor  # [batch_size + 1] int32: row b owns packed tokens cu_seqlens[b]:cu_seqlens[b + 1]
    max_seqlen: int  # real tokens in the longest row
    batch_size: int
    seq_len: int
    # Derived values that attention kernels compute once per batch rather than once per layer.
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Packing:
        indices, cu_seqlens, max_seqlen = _locate(attention_mask)
        return cls(indices, cu_seqlens, max_seqlen, *attention_mask.shape)

    @classmethod
    def of_batch(
        cls,
        attention_mask: torch.Tensor | None,
        shape: tuple[int, int],
        device: torch.device,
        indices: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> Packing:
        """The collator's precomputed packing when given, else computed from attention_mask (all
        tokens real when there is none, as in the stock model)."""
        if indices is not None and cu_seqlens is not None and max_seqlen is not None:
            return cls(indices.to(device), cu_seqlens.to(device), int(max_seqlen), *shape)
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        return cls.from_mask(attention_mask)

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    def cls_positions(self) -> torch.Tensor:
        """Packed position of every row's first real token ([CLS]), for the pooler."""
        return self.cu_seqlens[:-1].long()

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] (or [1, seq, ...], broadcast over rows) -> [tokens, ...]."""
        padded = padded.expand(self.batch_size, self.seq_len, *padded.shape[2:])
        return padded.reshape(self.batch_size * self.seq_len, *padded.shape[2:]).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[tokens, ...] -> [batch, seq, ...], padded positions set to `fill`; differentiable."""
        flat = packed.new_full((self.batch_size * self.seq_len, *packed.shape[1:]), fill)
        flat = flat.index_copy(0, self.indices, packed)
        return flat.view(self.batch_size, self.seq_len, *packed.shape[1:])


def _locate(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    lengths = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0


def packing_kwargs(attention_mask: torch.Tensor, mlm_labels: torch.Tensor | None = None) -> dict:
    """What a collator adds to a batch (on the CPU) so that the unpadded models need no device sync:
    `indices`, `cu_seqlens`, `max_seqlen` (an int: move only the tensors to the device) and, given
    token-level MLM labels, `masked_indices` (packed positions of the scored tokens, in
    `labels[labels != -100]` order)."""
    if (attention_mask.sum(dim=1) == 0).any():
        raise ValueError("every row of the batch needs at least one real token (attention_mask has an all-zero row)")
    if mlm_labels is not None and (mlm_labels[attention_mask == 0] != IGNORE_INDEX).any():
        raise ValueError("MLM labels on padding positions: the unpadded model scores real tokens only")
    indices, cu_seqlens, max_seqlen = _locate(attention_mask)
    kwargs = {"indices": indices, "cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
    if mlm_labels is not None:
        kwargs["masked_indices"] = masked_token_indices(mlm_labels.flatten().index_select(0, indices))
    return kwargs


def add_packing(batch: dict, mlm: bool = False) -> dict:
    """`batch` (a collated, right-padded CPU batch) with the packing_kwargs of its attention_mask
    added, and with `mlm` the scored positions of its token-level `labels`. Meant for the collate
    side (the trainer's loop now; DataLoader workers later): no device sync, and `max_seqlen` stays
    a Python int, so move only the tensors to the device. A batch without attention_mask counts
    every token as real, as the stock model does. Returns the same dict."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch["input_ids"].shape[:2], dtype=torch.long)
    batch.update(packing_kwargs(mask, mlm_labels=batch["labels"] if mlm else None))
    return batch


def masked_token_indices(packed_labels: torch.Tensor) -> torch.Tensor:
    """Packed positions whose label is scored (a device sync on CUDA; collators do it on the CPU)."""
    return torch.nonzero(packed_labels != IGNORE_INDEX, as_tuple=False).flatten()

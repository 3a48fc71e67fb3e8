"""Bidirectional attention over packed sequences: q, k, v are [tokens, heads, head_dim], and a
token attends to the tokens of its own row only (rows given by `Packing.cu_seqlens`).

Kernels, chosen per call by `choose_backend` (or forced with BERTSCALE_ATTENTION_BACKEND):
  flash_attn    CUDA, fp16/bf16, sm80+, the flash-attn package installed; attention dropout applied.
  torch_varlen  CUDA, fp16/bf16, sm80+: torch.nn.attention.varlen.varlen_attn (FlashAttention).
                Its kernel has no attention dropout, so it is chosen only when dropout_p is 0
                (evaluation, or a config with attention_probs_dropout_prob=0).
  nested_sdpa   CUDA, any dtype: SDPA on nested jagged tensors, which runs the flash or the
                memory-efficient varlen kernel; attention dropout applied.
  cpu_buckets   any device (the CPU path): rows sorted by length into a few buckets, each padded
                to its own longest row and run through SDPA with a key-padding mask; attention
                dropout applied. Forced onto CUDA it reads the row lengths (a sync).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import Packing

BACKEND_ENV = "BERTSCALE_ATTENTION_BACKEND"
BACKENDS = ("flash_attn", "torch_varlen", "nested_sdpa", "cpu_buckets")
APPLIES_ATTENTION_DROPOUT = {"flash_attn": True, "torch_varlen": False, "nested_sdpa": True, "cpu_buckets": True}
# More buckets pad less but make more, smaller SDPA calls. MiniLM's attention (fwd + bwd, seq 384,
# 16 SQuAD rows, dropout on) took 760 ms in one padded bucket, 250 ms in 4 and 230 ms in 8 or 16.
CPU_BUCKETS = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)

log = logging.getLogger(__name__)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    packing: Packing,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of every packed token over its own row; returns [tokens, heads, head_dim]."""
    backend = choose_backend(query.device, query.dtype, dropout_p)
    if dropout_p > 0 and not APPLIES_ATTENTION_DROPOUT[backend]:
        _warn_once(
            f"{backend} attention has no attention dropout: attention_probs_dropout_prob={dropout_p} is not applied"
        )
    return _KERNELS[backend](query, key, value, packing, dropout_p, scale)


def choose_backend(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0) -> str:
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced}: choose one of {', '.join(BACKENDS)}")
        return forced
    if device.type != "cuda":
        return "cpu_buckets"
    flash_capable = dtype in HALF_DTYPES and _capability(device.index) >= (8, 0)
    if flash_capable and _flash_attn_installed():
        return "flash_attn"
    if flash_capable and dropout_p == 0 and _torch_varlen_available():
        return "torch_varlen"
    return "nested_sdpa"


def describe_backend(device: torch.device | str, dtype: torch.dtype, dropout_p: float, training: bool = True) -> str:
    """One line for the run's log: the kernel that training uses and whether it applies attention
    dropout, and the kernel that evaluation uses (dropout off) where that is another one."""
    device = torch.device(device)
    where = f"unpadded attention on {device.type}/{str(dtype).removeprefix('torch.')}"
    evaluation = choose_backend(device, dtype, 0.0)
    if not training:
        return f"{where}: {evaluation} (evaluation, no attention dropout)"
    backend = choose_backend(device, dtype, dropout_p)
    if dropout_p == 0:
        dropout = "no attention dropout configured"
    elif APPLIES_ATTENTION_DROPOUT[backend]:
        dropout = f"attention dropout {dropout_p} applied"
    else:
        dropout = f"attention dropout {dropout_p} NOT applied (the kernel has none)"
    line = f"{where}: {backend} in training ({dropout})"
    return line if evaluation == backend else f"{line}, {evaluation} in evaluation"


@functools.cache
def _capability(device_index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return True


def _warn_once(message: str, _seen: set = set()) -> None:  # noqa: B006 -- the set remembers what was said
    if message not in _seen:
        _seen.add(message)
        log.warning(message)


def _flash_attn(query, key, value, packing: Packing, dropout_p, scale):
    from flash_attn import flash_attn_varlen_func

    cu, longest = packing.cu_seqlens, packing.max_seqlen
    return flash_attn_varlen_func(query, key, value, cu, cu, longest, longest, dropout_p=dropout_p, softmax_scale=scale)


def _torch_varlen(query, key, value, packing: Packing, dropout_p, scale):
    from torch.nn.attention.varlen import varlen_attn

    cu, longest = packing.cu_seqlens, packing.max_seqlen
    return varlen_attn(query, key, value, cu, cu, longest, longest, scale=scale)


def _nested_sdpa(query, key, value, packing: Packing, dropout_p, scale):
    if "offsets" not in packing.cache:  # one tensor for q, k and v: their jagged dims must be the same
        packing.cache["offsets"] = packing.cu_seqlens.long()
    offsets = packing.cache["offsets"]

    def jagged(x):  # [tokens, heads, dim] -> [batch, heads, jagged seq, dim]
        # min_seqlen=1 is the packing's rule (no empty row); given, like max_seqlen, it saves a sync.
        nested = torch.nested.nested_tensor_from_jagged(x, offsets, min_seqlen=1, max_seqlen=packing.max_seqlen)
        return nested.transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(query), jagged(key), jagged(value), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).values()


@dataclass
class _Bucket:
    rows: int
    width: int
    key_mask: torch.Tensor | None  # [rows, 1, 1, width], True = real key; None when no padding


@dataclass
class _Grids:
    """The buckets' padded grids, one after another in one flat [size, ...] tensor."""

    buckets: list[_Bucket]
    slots: torch.Tensor  # [tokens]: the grid slot of each packed token
    size: int  # slots in all grids, padding included


def _cpu_buckets(query, key, value, packing: Packing, dropout_p, scale):
    if "grids" not in packing.cache:
        packing.cache["grids"] = _make_grids(packing.cu_seqlens, CPU_BUCKETS)
    g = packing.cache["grids"]
    heads = query.shape[1:]
    # One scatter into zeros per tensor and a split into buckets: a CPU step is many small ops
    # otherwise, and slicing per bucket would give each slice a gradient the size of the whole grid.
    sizes = [b.rows * b.width for b in g.buckets]
    grids = [x.new_zeros(g.size, *heads).index_copy(0, g.slots, x).split(sizes) for x in (query, key, value)]
    outs = []
    for b, q, k, v in zip(g.buckets, *grids):
        q, k, v = (t.view(b.rows, b.width, *heads).transpose(1, 2) for t in (q, k, v))  # [rows, heads, width, dim]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=b.key_mask, dropout_p=dropout_p, scale=scale)
        outs.append(out.transpose(1, 2).reshape(b.rows * b.width, *heads))
    return torch.cat(outs).index_select(0, g.slots)


def _make_grids(cu_seqlens: torch.Tensor, max_buckets: int) -> _Grids:
    """Rows sorted by length and cut into up to `max_buckets` groups of equal row count, each padded
    to its own longest row."""
    cu = cu_seqlens.long()
    device = cu.device
    lengths = cu.diff()
    batch = lengths.shape[0]
    per_bucket = math.ceil(batch / min(max_buckets, batch))
    by_length = torch.argsort(lengths, stable=True)
    token_row = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    token_col = torch.arange(token_row.shape[0], device=device) - cu[:-1][token_row]
    row_offset = torch.empty(batch, dtype=torch.long, device=device)  # first grid slot of each row
    buckets, size = [], 0
    for first in range(0, batch, per_bucket):
        rows = by_length[first : first + per_bucket]
        row_lengths = lengths[rows]
        width = int(row_lengths.max())
        row_offset[rows] = size + torch.arange(rows.shape[0], device=device) * width
        key_mask = None
        if int(row_lengths.min()) < width:
            key_mask = (torch.arange(width, device=device)[None] < row_lengths[:, None])[:, None, None, :]
        buckets.append(_Bucket(rows.shape[0], width, key_mask))
        size += rows.shape[0] * width
    return _Grids(buckets, row_offset[token_row] + token_col, size)


_KERNELS = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "nested_sdpa": _nested_sdpa,
    "cpu_buckets": _cpu_buckets,
}

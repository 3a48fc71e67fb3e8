"""Bidirectional attention over packed sequences: q, k, v are [tokens, heads, head_dim], and a
token attends to the tokens of its own row only (rows given by `Packing.cu_seqlens`).

Kernels, chosen per call by `choose_backend` (or forced with BERTSCALE_ATTENTION_BACKEND):
  flash_attn    CUDA, fp16/bf16, sm80+, the flash-attn package installed; attention dropout applied.
  torch_varlen  CUDA, fp16/bf16, sm80+: torch.nn.attention.varlen.varlen_attn (FlashAttention).
                Its kernel has no attention dropout, so it is chosen only when dropout_p is 0
                (evaluation, or a config with attention_probs_dropout_prob=0).
  nested_sdpa   CUDA, any dtype: SDPA on nested jagged tensors, which runs the flash or the
                memory-efficient varlen kernel; attention dropout applied.
  cpu_rows      any device (the CPU path): one row at a time, no padding, attention dropout
                applied (cpu_kernels.py says why not SDPA). Forced onto CUDA it reads the row
                lengths (a sync).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from .cpu_kernels import row_attention
from .packing import Packing

BACKEND_ENV = "BERTSCALE_ATTENTION_BACKEND"
BACKENDS = ("flash_attn", "torch_varlen", "nested_sdpa", "cpu_rows")
APPLIES_ATTENTION_DROPOUT = {"flash_attn": True, "torch_varlen": False, "nested_sdpa": True, "cpu_rows": True}
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
        return "cpu_rows"
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


def _cpu_rows(query, key, value, packing: Packing, dropout_p, scale):
    if "bounds" not in packing.cache:  # Python ints: free on the CPU, a sync where forced onto CUDA
        cu = packing.cu_seqlens.tolist()
        packing.cache["bounds"] = list(zip(cu[:-1], cu[1:]))
        # where each row's first real token sits in its padded row: 0 when right-padded
        firsts = packing.indices.index_select(0, packing.cu_seqlens[:-1].long()).tolist()
        packing.cache["grid"] = (packing.seq_len, [at - row * packing.seq_len for row, at in enumerate(firsts)])
    if scale is None:
        scale = query.shape[-1] ** -0.5
    return row_attention(query, key, value, packing.cache["bounds"], dropout_p, scale, packing.cache["grid"])


_KERNELS = {
    "flash_attn": _flash_attn,
    "torch_varlen": _torch_varlen,
    "nested_sdpa": _nested_sdpa,
    "cpu_rows": _cpu_rows,
}

"""The unpadded model's CPU kernel: attention one row at a time, with attention dropout on bool masks.

Why not SDPA: on the CPU, SDPA applies attention dropout only on its math path, which works on
the whole padded [rows, heads, seq, seq] grid. A row at a time the [heads, len, len] scores of one
sequence stay in cache and need no padding mask. The masks come from torch's own bernoulli_, drawn
over the padded grid that the stock model's SDPA draws over, so both modes drop the same weights. Masks
read from 16-bit lanes of random 64-bit words were 6x cheaper and passed every per-element check
(drop rate, lanes, neighbours), yet MiniLM's SQuAD runs with them scored 2.6 to 8.2 F1 lower than
the same runs with bernoulli_ masks, in three of three seeds (docs/unpadding.md).
"""

from __future__ import annotations

import torch


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """A Bernoulli keep-mask (bool, `shape`) that drops each element with probability p, and the scale
    1 / (1 - p). Drawn from torch's default generator: seeding torch and restoring its RNG state
    (resume, activation checkpointing) give the same masks."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    # drawn straight into bool: the same masks as a float draw then .bool(), without the float copy
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p), 1 / (1 - p)


def row_attention(
    query,
    key,
    value,
    bounds: list[tuple[int, int]],
    dropout_p: float,
    scale: float,
    grid: tuple[int, list[int]] | None = None,
):
    """Softmax attention of each packed row [start, end) over itself; q, k, v and the result are
    [tokens, heads, head_dim]. Softmax in fp32 for fp16/bf16 inputs.

    With dropout, one keep-mask is drawn over the padded [rows, heads, seq, seq] grid. `grid` is
    (seq, offsets): the padded batch's width, and where each row's real tokens start in its padded
    row; (the longest row's length, all 0) when not given. That is the grid the stock model's SDPA
    draws its mask over, in the same order, and each row reads its own [heads, len, len] block of
    it: a seeded --unpad run drops the same attention weights as --no-unpad."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return _RowAttention.apply(query, key, value, bounds, dropout_p, scale, grid)
    return _row_attention_forward(query, key, value, bounds, dropout_p, scale, grid)[0]


def _row_masks(query, bounds, dropout_p, grid):
    """A keep-mask over the padded grid, its scale, and each row's [heads, len, len] block of it."""
    seq = grid[0] if grid is not None else max(end - start for start, end in bounds)
    keep, keep_scale = keep_mask((len(bounds), query.shape[1], seq, seq), dropout_p, query.device)
    return keep, keep_scale, _blocks(keep, bounds, grid)


def _blocks(keep, bounds, grid):
    offsets = grid[1] if grid is not None else [0] * len(bounds)
    return [
        keep[row, :, at : at + end - start, at : at + end - start]
        for row, ((start, end), at) in enumerate(zip(bounds, offsets))
    ]


def _row_attention_forward(query, key, value, bounds, dropout_p, scale, grid):
    # The scales go on the [heads, len, dim] tensors, never on the larger [heads, len, len] ones.
    out = torch.empty_like(query)
    probs, keep, keep_scale = [], None, 1.0
    if dropout_p > 0:
        keep, keep_scale, blocks = _row_masks(query, bounds, dropout_p, grid)
    for row, (start, end) in enumerate(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # [heads, len, dim]
        p = torch.bmm(q * scale, k.transpose(1, 2)).softmax(-1, dtype=_softmax_dtype(q.dtype))
        attended = _dropped(p, blocks[row]) if dropout_p > 0 else p
        row_out = torch.bmm(attended.to(v.dtype), v)
        out[start:end] = (row_out.mul_(keep_scale) if dropout_p > 0 else row_out).transpose(0, 1)
        probs.append(p)
    return out, probs, keep, keep_scale


def _dropped(probs, keep):
    # mul, though it first copies the bool block to floats: MiniLM's forward + backward at seq 256
    # (8 rows, one thread) took 1646 ms with it against 1707 ms with torch.where(keep, probs, 0)
    return probs * keep


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _RowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bounds, dropout_p, scale, grid):
        out, probs, keep, keep_scale = _row_attention_forward(query, key, value, bounds, dropout_p, scale, grid)
        # save_for_backward, not attributes: activation checkpointing frees and recomputes only these.
        ctx.save_for_backward(query, key, value, *probs, *([] if keep is None else [keep]))
        ctx.bounds, ctx.scale, ctx.keep_scale, ctx.grid = bounds, scale, keep_scale, grid
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, *saved = ctx.saved_tensors
        rows = len(ctx.bounds)
        probs = saved[:rows]
        # the grid's keep-mask, when there is one: each row reads its block as in the forward
        blocks = _blocks(saved[rows], ctx.bounds, ctx.grid) if len(saved) > rows else [None] * rows
        grads = [torch.empty_like(t) for t in (query, key, value)]
        for (start, end), p, keep in zip(ctx.bounds, probs, blocks):
            q, k, v, g = (t[start:end].transpose(0, 1) for t in (query, key, value, grad_out))
            attended = p
            if keep is not None:
                attended, g = _dropped(p, keep), g * ctx.keep_scale
            grads[2][start:end] = torch.bmm(attended.transpose(1, 2).to(g.dtype), g).transpose(0, 1)
            d_attended = torch.bmm(g, v.transpose(1, 2)).to(p.dtype)
            if keep is None:
                d_scores = torch._softmax_backward_data(d_attended, p, -1, p.dtype)
            else:  # softmax's backward p * (dp - sum(dp * p)) with dp = keep * d_attended: no mask op needed
                d_scores = attended.mul_(d_attended)
                d_scores.addcmul_(p, d_scores.sum(-1, keepdim=True), value=-1)
            d_scores = d_scores.to(q.dtype)
            grads[0][start:end] = torch.bmm(d_scores, k).mul_(ctx.scale).transpose(0, 1)
            grads[1][start:end] = torch.bmm(d_scores.transpose(1, 2), q).mul_(ctx.scale).transpose(0, 1)
        return *grads, None, None, None, None

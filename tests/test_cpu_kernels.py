"""The unpadded model's CPU kernels (bertscale/unpad/cpu_kernels.py): bool dropout masks from
bernoulli_, and attention row by row with attention dropout, its mask drawn over the padded grid.
Without dropout the row kernel is checked against SDPA per row in tests/test_unpadded.py; here,
with dropout, against the same formula written with autograd ops and the same masks."""

import pytest
import torch
from test_unpadded import make_batch
from transformers import BertForQuestionAnswering

from bertscale import models
from bertscale.unpad import unpadded_class
from bertscale.unpad.cpu_kernels import keep_mask, row_attention


def test_keep_mask_drops_p_and_scales_to_an_expectation_of_one():
    torch.manual_seed(0)
    keep, scale = keep_mask((1000, 4000), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (1000, 4000)
    assert abs((~keep).float().mean().item() - 0.1) < 1e-3
    assert scale == pytest.approx(1 / 0.9)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        keep_mask((3,), 1.0)


def reference_attention_with_masks(q, k, v, bounds, p, scale, seq, offsets):
    """The same attention as autograd ops, with one mask drawn over the padded [rows, heads, seq, seq]
    grid and each row reading its block at its offset (where its real tokens start)."""
    keep, keep_scale = keep_mask((len(bounds), q.shape[1], seq, seq), p)
    outs = []
    for row, ((start, end), at) in enumerate(zip(bounds, offsets)):
        qr, kr, vr = (t[start:end].transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(qr @ kr.transpose(1, 2) * scale, dim=-1)
        block = keep[row, :, at : at + end - start, at : at + end - start]
        outs.append((probs * block * keep_scale @ vr).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("grid", [None, (40, [0, 39, 5, 0])], ids=["longest_row", "padded_grid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_row_attention_with_dropout_equals_the_formula_with_the_same_masks(dtype, grid):
    lengths = [9, 1, 30, 17]
    cu = torch.tensor([0, *lengths]).cumsum(0).tolist()
    bounds = list(zip(cu[:-1], cu[1:]))
    q, k, v = (torch.randn(sum(lengths), 3, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    torch.manual_seed(7)
    got = row_attention(q, k, v, bounds, 0.3, 0.35, grid)
    torch.manual_seed(7)
    seq, offsets = grid or (max(lengths), [0] * len(lengths))
    expected = reference_attention_with_masks(*(t.double() for t in (q, k, v)), bounds, 0.3, 0.35, seq, offsets)
    tolerance = {} if dtype == torch.float64 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got.double(), expected, **tolerance)
    upstream = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream.double())
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad.double(), expected_grad.double(), **tolerance)
    with torch.no_grad():  # evaluation takes the same path without saving anything
        torch.manual_seed(7)
        torch.testing.assert_close(row_attention(q, k, v, bounds, 0.3, 0.35, grid), got.detach())


def test_activation_checkpointing_recomputes_the_same_dropout_masks():
    """Checkpointed layers run their forward again in the backward: the masks must be the same draws."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models.build_model("tiny", BertForQuestionAnswering)  # dropout 0.1, attention dropout 0.1
        model = unpadded_class(BertForQuestionAnswering)(model.config).train()
        if checkpointing:
            models.enable_activation_checkpointing(model)
        batch = make_batch(model.config)
        torch.manual_seed(1)
        loss = model(**batch, start_positions=torch.tensor([3, 0, 20, 6, 9]), end_positions=torch.tensor([5] * 5)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)

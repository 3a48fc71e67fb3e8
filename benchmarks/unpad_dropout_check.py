"""Does the unpadded model train like the stock one where their randomness differs? The loss and the
gradient norm of MiniLM's QA model on one fixed batch, dropout off and then over many dropout draws,
stock BertForQuestionAnswering against bertscale's unpadded one (same weights).

    python benchmarks/unpad_dropout_check.py               # rows of 120-256 tokens: the QA losses differ
    python benchmarks/unpad_dropout_check.py --full-rows   # no padding: both compute the same loss

With --full-rows the two must agree without dropout, and with dropout their means and spreads show
whether the unpadded masks (cpu_kernels.keep_mask) drop as nn.Dropout does. With padded rows, stock's
QA loss also puts the padded positions into its softmax (docs/unpadding.md), and the figures show how
much that changes the loss and the gradient.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inputs import resolve  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)


def set_dropout(model, p: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p  # the unpadded layers read p from these modules, attention's included


def draws(model, batch: dict, extra: dict, count: int) -> tuple[list[float], list[float]]:
    """(losses, gradient norms) over `count` seeds of the dropout masks."""
    model.train()
    losses, norms = [], []
    for i in range(count):
        torch.manual_seed(100 + i)
        model.zero_grad(set_to_none=True)
        loss = model(**batch, **extra).loss
        loss.backward()
        losses.append(loss.item())
        norms.append(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm().item())
    return losses, norms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--full-rows", action="store_true", help="every row 256 tokens: no padding")
    ap.add_argument("--draws", type=int, default=30)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args(argv)
    from transformers import BertForQuestionAnswering

    from bertscale.unpad.models import UnpaddedBertForQuestionAnswering
    from bertscale.unpad.packing import packing_kwargs

    path = resolve(args.model)
    torch.manual_seed(0)
    stock = BertForQuestionAnswering.from_pretrained(path)
    ours = UnpaddedBertForQuestionAnswering.from_pretrained(path)
    ours.load_state_dict(stock.state_dict())  # the new QA head too

    rows, seq = 8, 256
    g = torch.Generator().manual_seed(1)
    lengths = torch.full((rows,), seq) if args.full_rows else torch.randint(120, seq + 1, (rows,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 20000, (rows, seq), generator=g) * mask
    starts = (lengths * 0.3).long()
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                 start_positions=starts, end_positions=starts + 3)  # fmt: skip

    print(f"{args.model}, {rows} rows of {lengths.min()}-{lengths.max()} tokens, {args.draws} dropout draws")
    for label, p, count in (("dropout off", 0.0, 1), (f"dropout {args.dropout}", args.dropout, args.draws)):
        set_dropout(stock, p)
        set_dropout(ours, p)
        a, b = draws(stock, batch, {}, count), draws(ours, batch, packing_kwargs(mask), count)
        for name, x, y in (("loss", a[0], b[0]), ("grad norm", a[1], b[1])):
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (x, y)]
            print(
                f"{label:12} {name:9} stock {statistics.mean(x):.4f} +- {sd[0]:.4f}   "
                f"unpadded {statistics.mean(y):.4f} +- {sd[1]:.4f}"
            )


if __name__ == "__main__":
    main()

"""What bertscale's training loop costs on top of the model's own work.

    python benchmarks/step_overhead.py                      # tiny and MiniLM, seq 384, micro batch 16, CPU
    python benchmarks/step_overhead.py --models minilm --steps 12
    python benchmarks/step_overhead.py --device cuda --models bert-large-uncased --precision bf16

The same SQuAD batches (real training windows, drawn as the trainer draws them) through
  (a) bertscale's loop: trainer.setup + trainer.fit, i.e. DataLoader workers that collate, pack and
      pin, the DeepSpeed engine (ZeRO-2, one rank), logging every 10 steps, the stop-flag agreement;
  (b) a bare loop over batches already on the device: forward, backward and a fused AdamW step of a
      plain copy of the model (same weights, no DeepSpeed, no data pipeline),
in alternating rounds, once with --unpad and once with --no-unpad. A step of (a) is the time between
two engine steps; the first step of each round (worker start-up, warm-up) is left out of both.
Prints, per model and mode: median ms per step of (a) and (b), the overhead ratio (a)/(b), the
share of computed tokens that are padding, and real tokens per second through (a).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unpadded_step import SQUAD_TRAIN, resolve  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)


def bertscale_training(model: str, unpad: bool, args, out: Path):
    """A set-up bertscale run (trainer.setup) on SQuAD windows, with engine.step timed."""
    from bertscale import tasks, trainer

    run = tasks.make_run(
        "squad",
        model=model,
        train_file=str(SQUAD_TRAIN),
        max_train_samples=args.micro_batch * (args.rounds * args.steps + 8),
        max_seq_length=args.seq_len,
        micro_batch_size=args.micro_batch,
        ds_config="zero2",
        precision=args.precision,
        gradient_checkpointing=False,
        unpad=unpad,
        epochs=1,
        save_every=0,
        wandb_mode="disabled",
        output_dir=str(out),
        overwrite_output_dir=True,
    )
    t = trainer.setup(run)
    stamps = []
    step = t.engine.step

    def timed_step(*a, **k):
        result = step(*a, **k)
        if args.device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return result

    t.engine.step = timed_step
    return t, stamps


def run_round(t, stamps, steps: int) -> list[float]:
    """`steps` more steps of trainer.fit; the seconds between consecutive engine steps."""
    from bertscale import trainer

    stamps.clear()
    t.steps = dataclasses.replace(t.steps, total_steps=t.state.step + steps)
    trainer.fit(t)
    return [b - a for a, b in zip(stamps, stamps[1:])]  # the first step (workers starting) left out


def device_batches(t, count: int) -> list[dict]:
    """The batches bertscale's loader makes for this run (collated, packed), moved to the device."""
    from bertscale import loader
    from bertscale.evaluation import model_inputs

    batches = loader.train_epoch(
        t.train_feats, t.lengths, t.split, t.run.optim.seed, 0, (0, t.split.global_batch),
        t.run.data.group_by_length, t.collate, 0, pin_memory=False,
    )  # fmt: skip
    out = []
    for batch, _ in batches:
        out.append(model_inputs(batch, t.task, t.engine.device))
        if len(out) == count:
            break
    return out


def bare_loop(t, args):
    """A plain copy of the engine's model and a fused AdamW: a step over pre-built device tensors."""
    model = type(t.engine.module)(t.engine.module.config).to(t.engine.device)
    model.load_state_dict(t.engine.module.state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def steps(batches: list[dict]) -> list[float]:
        stamps = []
        for batch in batches:
            with torch.autocast(t.engine.device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return steps


def padding_share(batches: list[dict], unpad: bool) -> tuple[float, int]:
    """(share of computed token positions that are padding, real tokens per batch on average)."""
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    return (0.0 if unpad else 1 - real / computed), real // len(batches)


def measure(model: str, unpad: bool, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t, stamps = bertscale_training(resolve(model), unpad, args, Path(tmp))
        batches = device_batches(t, args.rounds * args.steps)  # the ones bertscale's rounds train on
        bare = bare_loop(t, args)
        ours, theirs = [], []
        for r in range(args.rounds):  # alternating, so machine noise hits both alike
            ours += run_round(t, stamps, args.steps)
            theirs += bare(batches[r * args.steps : (r + 1) * args.steps])
        t.tracker.finish()
    padding, real_tokens = padding_share(batches, unpad)
    a, b = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
    return {"a_ms": a, "b_ms": b, "ratio": a / b, "padding": padding, "tokens_s": real_tokens / (a / 1000)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm", help="comma-separated: tiny, minilm, a model dir or hub id")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (a) and (b)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from bertscale import console
    from bertscale import distributed as dist

    console.setup()
    dist.setup()
    print(
        f"seq {args.seq_len}, micro batch {args.micro_batch}, {args.precision} on {args.device}, "
        f"{args.rounds} x {args.steps} steps each, torch threads {torch.get_num_threads()}"
    )
    print(f"{'model':<12} {'mode':<11} {'(a) ms':>9} {'(b) ms':>9} {'(a)/(b)':>8} {'padding':>8} {'tokens/s':>9}")
    for model in args.models.split(","):
        for unpad in (True, False):
            r = measure(model, unpad, args)
            print(
                f"{model:<12} {'--unpad' if unpad else '--no-unpad':<11} {r['a_ms']:9.1f} {r['b_ms']:9.1f} "
                f"{r['ratio']:8.2f} {r['padding']:8.1%} {r['tokens_s']:9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""What bertscale's training loop costs on top of the model's own work.

    python benchmarks/step_overhead.py                      # tiny and MiniLM, seq 384, micro batch 16, CPU
    python benchmarks/step_overhead.py --models minilm --steps 12 --ds-configs single_node
    python benchmarks/step_overhead.py --device cuda --models bert-large-uncased --precision bf16

The same SQuAD batches (real training windows, drawn as the trainer draws them) through
  (a) bertscale's loop: trainer.setup + trainer.fit, i.e. DataLoader workers that collate, pack and
      pin, the DeepSpeed engine (one rank; each --ds-configs preset in turn), logging every 10 steps,
      the stop-flag agreement;
  (b) a bare loop over batches already on the device: forward, backward and a fused AdamW step of a
      plain copy of the model (same weights, no DeepSpeed, no data pipeline),
paired step by step: right after each engine step of (a), (b) takes its step on the batch (a) just
trained on, so both see the same moment of a noisy machine. A step of (a) is the time from the end
of that (b) step to the end of the next engine step (fetching the batch included); the first step of
each (worker start-up, optimizer state allocation) is left out. Once with --unpad, once with --no-unpad.
Prints, per model, mode and config: median ms per step of (a) and (b); the overhead ratio (a)/(b), the
time all steps of (a) took over the time (b) took on the same batches (the medians of the two columns
can fall on different batches, as step times vary with the batch's length); the median of the pairs'
own ratios (steadier when the machine's speed drifts); the share of computed tokens that are padding;
and real tokens per second through (a).
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

from bench_inputs import SQUAD_TRAIN, resolve  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)


def bertscale_training(model: str, unpad: bool, ds_config: str, args, out: Path):
    """A set-up bertscale run (trainer.setup) on SQuAD windows, `args.steps` + 1 steps long."""
    from bertscale import tasks, trainer

    run = tasks.make_run(
        "squad",
        model=model,
        train_file=str(SQUAD_TRAIN),
        max_train_samples=args.micro_batch * (args.steps + 8),
        max_seq_length=args.seq_len,
        micro_batch_size=args.micro_batch,
        ds_config=ds_config,
        precision=args.precision,
        gradient_checkpointing=False,
        unpad=unpad,
        epochs=1,
        save_every=0,
        wandb_mode="disabled",
        output_dir=str(out),
        overwrite_output_dir=True,
        dataloader_workers=args.dataloader_workers,
    )
    t = trainer.setup(run)
    t.steps = dataclasses.replace(t.steps, total_steps=args.steps + 1)
    return t


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


def bare_step(t, args):
    """A plain copy of the engine's model and a fused AdamW: step(batch) -> seconds for one step."""
    model = type(t.engine.module)(t.engine.module.config).to(t.engine.device)
    model.load_state_dict(t.engine.module.state_dict())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step(batch: dict) -> float:
        start = time.perf_counter()
        with torch.autocast(t.engine.device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def pair(t, args, batches: list[dict]) -> tuple[list[float], list[float]]:
    """trainer.fit with a step of the bare loop on the same batch after every engine step:
    (a) and (b) seconds per step, the first step of each left out."""
    from bertscale import trainer

    bare = bare_step(t, args)
    ours, theirs, since = [], [], [None]
    step = t.engine.step

    def paired(*a, **k):
        result = step(*a, **k)
        if args.device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        if since[0] is not None:  # the first step (workers starting) is left out
            ours.append(end - since[0])
        seconds = bare(batches[len(ours)])
        if since[0] is not None:
            theirs.append(seconds)
        since[0] = time.perf_counter()
        return result

    t.engine.step = paired
    trainer.fit(t)
    return ours, theirs


def padding_share(batches: list[dict], unpad: bool) -> tuple[float, int]:
    """(share of computed token positions that are padding, real tokens per batch on average)."""
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
    computed = sum(b["input_ids"].numel() for b in batches)
    return (0.0 if unpad else 1 - real / computed), real // len(batches)


def measure(model: str, unpad: bool, ds_config: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = bertscale_training(resolve(model), unpad, ds_config, args, Path(tmp))
        batches = device_batches(t, args.steps + 1)  # the ones bertscale's loop trains on, in its order
        ours, theirs = pair(t, args, batches)
        t.tracker.finish()
    return summarize(ours, theirs, batches, unpad)


def summarize(ours: list[float], theirs: list[float], batches: list[dict], unpad: bool) -> dict:
    """The table's figures from pair()'s timings; step_overhead_before.py uses it too."""
    timed = batches[1 : len(ours) + 1]  # the first step is left out of the timings, so out of the tokens too
    padding, real_tokens = padding_share(timed, unpad)
    a, b = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
    ratio = sum(ours) / sum(theirs)  # the same batches through both
    pairs = statistics.median(x / y for x, y in zip(ours, theirs))  # each pair ran at the same moment
    tokens_s = real_tokens * len(timed) / sum(ours)
    return {"a_ms": a, "b_ms": b, "ratio": ratio, "pairs": pairs, "padding": padding, "tokens_s": tokens_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm", help="comma-separated: tiny, minilm, a model dir or hub id")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (pairs of (a) and (b))")
    ap.add_argument(
        "--ds-configs", default="single_node,zero2", help="comma-separated DeepSpeed presets for (a) (ds_configs/)"
    )
    ap.add_argument("--dataloader-workers", type=int, default=None, help="for (a); default: bertscale's default")
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
        f"{args.steps} paired steps, torch threads {torch.get_num_threads()}"
    )
    rows = []
    for model in args.models.split(","):
        for unpad in (True, False):
            for ds_config in args.ds_configs.split(","):
                r = measure(model, unpad, ds_config, args)
                rows.append(
                    f"{model:<12} {'--unpad' if unpad else '--no-unpad':<11} {ds_config:<12} {r['a_ms']:9.1f} "
                    f"{r['b_ms']:9.1f} {r['ratio']:8.2f} {r['pairs']:8.2f} {r['padding']:8.1%} {r['tokens_s']:9.0f}"
                )
                print(rows[-1], flush=True)
    # the table once more at the end, without the runs' own lines in between
    head = ("model", "mode", "config", "(a) ms", "(b) ms", "(a)/(b)", "pairs", "padding", "tokens/s")
    print("{:<12} {:<11} {:<12} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}".format(*head))
    print("\n".join(rows))


if __name__ == "__main__":
    main()

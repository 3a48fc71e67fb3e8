"""step_overhead.py's paired measurement on a bertscale checkout from before issue #15 (padded
batches collated in the rank, no unpadding, no loader workers, the zero2 preset it defaulted to).

    git worktree add /tmp/before 26e07aa        # the architecture commit: setup -> fit, before #15
    python benchmarks/step_overhead_before.py /tmp/before --models tiny --steps 10

Same SQuAD windows, same seq length and micro batch, the same bare loop (b) paired step by step;
prints the table of step_overhead.py for that checkout (mode --no-unpad, config zero2).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _inside(module, args) -> bool:
    where = getattr(module, "__file__", None)
    return where is None or Path(where).resolve().is_relative_to(Path(args.checkout).resolve())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", help="a bertscale work tree from before #15")
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    args.device, args.precision = "cpu", "fp32"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.path.insert(0, str(Path(args.checkout).resolve()))  # its bertscale package, not this one

    from bertscale import data, tasks, trainer
    from bertscale import distributed as dist
    from bertscale.evaluation import model_inputs

    sys.path.insert(1, str(HERE))
    import step_overhead as bench  # the pairing and the bare loop; its own bertscale imports are lazy

    dist.setup()
    print(
        f"{args.checkout}: seq {args.seq_len}, micro batch {args.micro_batch}, fp32 on cpu, {args.steps} paired steps"
    )
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            run = tasks.make_run(
                "squad",
                model=bench.resolve(model),
                train_file=str(bench.SQUAD_TRAIN),
                max_train_samples=args.micro_batch * (args.steps + 8),
                max_seq_length=args.seq_len,
                micro_batch_size=args.micro_batch,
                ds_config="zero2",
                precision="fp32",
                gradient_checkpointing=False,
                epochs=1,
                save_every=0,
                wandb_mode="disabled",
                output_dir=tmp,
                overwrite_output_dir=True,
            )
            t = trainer.setup(run)
            t.steps = dataclasses.replace(t.steps, total_steps=args.steps + 1)
            batches = []
            for _, rows, _ in data.epoch_batches(
                t.train_feats, t.lengths, args.micro_batch, 1, 0, run.optim.seed, 0, 0, True
            ):
                batches.append(model_inputs(t.task.collate(rows), t.task, t.engine.device))
                if len(batches) == args.steps + 1:
                    break
            ours, theirs = bench.pair(t, args, batches)
            t.tracker.finish()
        # every bertscale module this ran must be the checkout's (an editable install of this repo
        # can otherwise supply a module the checkout lacks)
        strays = [m.__file__ for n, m in sys.modules.items() if n.startswith("bertscale") and not _inside(m, args)]
        if strays:
            raise SystemExit(f"not from {args.checkout}: {', '.join(strays)}")
        r = bench.summarize(ours, theirs, batches, unpad=False)
        line = f"{model:<12} {'before':<11} {'zero2':<12} {r['a_ms']:9.1f} {r['b_ms']:9.1f} {r['ratio']:8.2f}"
        print(f"{line} {r['pairs']:8.2f} {r['padding']:8.1%} {r['tokens_s']:9.0f}")


if __name__ == "__main__":
    main()

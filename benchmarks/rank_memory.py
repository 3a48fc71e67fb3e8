"""Where one pretraining rank's memory goes: its PSS after each phase of trainer.setup and after the
first steps, then the process's maps grouped by kind (malloc heap, anonymous, libraries, the shards).

    python benchmarks/rank_memory.py                          # prepares a 10 MB corpus first (tiny model)
    python benchmarks/rank_memory.py --prepared-data DATA/ --model M

One process (world size 1) runs `bertscale pretrain` in-process. The same phases, on any number of
ranks, are each rank's own: what a second rank costs before it reads any data.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 2**20


def pss() -> str:
    d = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                d[parts[0].rstrip(":")] = int(parts[1]) // 1024
    return f"{d['Pss']:5d} MB PSS (anonymous {d['Pss_Anon']}, files {d['Pss_File']})"


def maps_by_kind(shards: Path) -> dict[str, int]:
    """PSS in MB of this process's memory maps, by kind."""
    out, name = collections.Counter(), ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a map's header: address perms offset dev inode [path]
                name = parts[5] if len(parts) > 5 else ""
            elif parts[0] == "Pss:":
                kind = (
                    "malloc heap" if name == "[heap]"
                    else "anonymous" if not name
                    else "shards" if name.startswith(str(shards))
                    else "shared libraries" if ".so" in name
                    else "other"
                )  # fmt: skip
                out[kind] += int(parts[1])
    return {k: v // 1024 for k, v in out.most_common()}


def after(module, name: str, label: str) -> None:
    """Print the PSS each time module.name returns."""
    f = getattr(module, name)

    @functools.wraps(f)
    def wrapped(*a, **k):
        result = f(*a, **k)
        print(f"{label:<34} {pss()}", flush=True)
        return result

    setattr(module, name, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared-data", type=Path, help="a `bertscale prepare --task pretrain` output")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="rank-memory-"))
    prepared = args.prepared_data
    if prepared is None:
        import pretrain_data_scaling as scaling

        (work / "text").mkdir()
        scaling.build_corpus(work / "text", 10, scaling.source_texts())
        prepared = work / "prepared"
        scaling.run_prepare(work / "text", prepared, args.model, 2, args.seq_len)
    print(f"{'python started':<34} {pss()}", flush=True)
    from bertscale import cli, trainer

    print(f"{'bertscale imported':<34} {pss()}", flush=True)
    after(trainer.models, "load_tokenizer", "process group up, tokenizer")
    after(trainer.dist, "main_first", "training and held-out data")
    after(trainer.engines, "build", "DeepSpeed engine")
    fit = trainer.fit

    def fit_counting_steps(t):
        step, done = t.engine.step, [0]

        def counted(*a, **k):
            result = step(*a, **k)
            done[0] += 1
            if done[0] in (1, args.steps):
                print(f"{f'after step {done[0]}':<34} {pss()}", flush=True)
                if done[0] == args.steps:
                    print("maps by kind, MB of PSS:", maps_by_kind(prepared.resolve()), flush=True)
            return result

        t.engine.step = counted
        return fit(t)

    trainer.fit = fit_counting_steps
    flags = ["--prepared-data", str(prepared), "--model", args.model, "--max-seq-length", str(args.seq_len)]
    flags += ["--micro-batch-size", str(args.micro_batch), "--max-steps", str(args.steps), "--save-every", "0"]
    flags += ["--max-eval-samples", "64", "--ds-config", "zero2", "--wandb-mode", "disabled"]
    flags += ["--output-dir", str(work / "run"), "--overwrite-output-dir"]
    sys.argv = ["bertscale", "pretrain", *flags]
    from bertscale import distributed

    leave = distributed.exit_process

    def clean_up_and_leave(code: int = 0):
        shutil.rmtree(work)  # the corpus, the prepared data and the run
        leave(code)

    distributed.exit_process = clean_up_and_leave  # a rank that joined a process group ends in os._exit
    cli.main()


if __name__ == "__main__":
    main()

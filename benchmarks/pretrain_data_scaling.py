"""How preparing a pretraining corpus scales: 10, 40 and 160 MB of text, and a projection for 10 GB.

    python benchmarks/pretrain_data_scaling.py                      # 10, 40, 160 MB, all cores, --model tiny
    python benchmarks/pretrain_data_scaling.py --sizes 5 20 --no-train

For each size it builds a corpus from the text in ../shared/data/corpus (the four Gutenberg books as
they are, wrappers included, and WikiText-2's articles one per blank-line-separated block, copied
round-robin into files until the size is reached), then measures:
  prepare      wall time of `python -m bertscale prepare` (start-up included; the fastest of --repeat
               runs, the sizes alternating), MB of text per second, the CPU time of its process tree,
               and the workers' own seconds per MB of text (from the manifest: the work itself, the
               steadiest sign of whether preparing scales linearly on a shared machine)
  peak memory  the largest sum of PSS over the whole process tree (the command and its workers),
               sampled every 0.2 s; PSS shares each shared page among the processes that map it
  on disk      bytes of the prepared directory
  first step   seconds from launching `deepspeed --num_gpus 2 ... pretrain` on the prepared corpus to
               the first training step (DeepSpeed's JIT-built CPU ops cached: see main), the two
               ranks' PSS at their peak (each, and the peak of their sum), and at the first step the
               RSS and PSS of each rank's memory maps of the shards: pages both ranks map count half
               in each PSS
  one rank     at the smallest and the largest size, the same launch with one rank: what a second
               rank adds to one, and whether the data's growth doubles with two ranks (a copy per
               rank) or not (--no-one-rank skips it); both launches run without loader workers
It prints a table, what 10 GB would take at the largest size's rate, and the one-rank comparison.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("BERTSCALE_SHARED", ROOT.parent / "shared"))
CORPUS = SHARED / "data" / "corpus"
MB = 2**20
ENV = {
    "DS_ACCELERATOR": "cpu",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


# --- corpora -----------------------------------------------------------------------------------
def source_texts() -> list[tuple[str, bytes]]:
    """(name, bytes) of the sources: the books as they are, WikiText articles as blank-line blocks."""
    from bertscale.tasks.pretraining_data import read_documents

    books = [(p.stem, p.read_bytes()) for p in sorted((CORPUS / "gutenberg").glob("*.txt"))]
    articles, _ = read_documents([str(CORPUS / "wikitext-2-raw" / "wiki.test.raw")], "heading", "text")
    return [*books, ("wiki", "\n\n".join(articles).encode() + b"\n")]


def build_corpus(folder: Path, megabytes: float, sources) -> int:
    """Copies of the sources, round-robin, one file each, until `megabytes` (the last one cut at a line)."""
    folder.mkdir(parents=True, exist_ok=True)
    target, written, i = int(megabytes * MB), 0, 0
    while written < target:
        name, text = sources[i % len(sources)]
        if written + len(text) > target:
            text = text[: text.rfind(b"\n", 0, target - written) + 1] or text[: target - written]
        (folder / f"{i:05d}-{name}.txt").write_bytes(text)
        written += len(text)
        i += 1
    return written


# --- measuring ---------------------------------------------------------------------------------
class TreeMemory:
    """Samples the PSS of a process and all its descendants until it ends; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_ranks = 0  # of the sum over the processes launched as ranks (--local_rank)
        self.peak_by_pid: dict[int, tuple[int, str]] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import psutil

        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            total = ranks = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in tree:
                try:
                    pss = proc.memory_full_info().pss
                    cmd = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                total += pss
                ranks += pss if "--local_rank" in cmd else 0
                if pss > self.peak_by_pid.get(proc.pid, (0, ""))[0]:
                    self.peak_by_pid[proc.pid] = (pss, cmd)
            self.peak_total = max(self.peak_total, total)
            self.peak_ranks = max(self.peak_ranks, ranks)
            time.sleep(self.interval)

    def stop(self) -> None:
        self.thread.join(timeout=5)


def children_cpu_seconds() -> float:
    """User + system CPU seconds of all finished descendants (each waited for by its parent): on a
    shared machine this grows with the work done, while wall time also grows with the others' load."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(files: Path, out: Path, model: str, workers: int, seq: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "bertscale",
        "prepare",
        "--task",
        "pretrain",
        "--model",
        model,
        "--train-files",
        str(files / "*.txt"),
        "--output-dir",
        str(out),
        "--preprocessing-workers",
        str(workers),
        "--max-seq-length",
        str(seq),
    ]
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    memory = TreeMemory(proc.pid)
    output = proc.communicate()[0]
    seconds = time.perf_counter() - started
    cpu = children_cpu_seconds() - cpu_before
    memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output}")
    manifest = json.loads((out / "manifest.json").read_text())
    # the workers' own seconds per shard: the work itself, without start-up or waiting for a core
    shard_seconds = sum(shard["seconds"] for shard in manifest["shards"])
    disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "shard_seconds": shard_seconds,
        "peak_pss": memory.peak_total,
        "disk": disk,
        "shards": manifest["totals"]["shards"],
        "pairs": manifest["totals"]["train_rows"],
        "tokens": manifest["totals"]["train_tokens"],
    }


def mapped_memory(pid: int, folder: Path) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process's memory maps of the files under `folder` (the Arrow shards)."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping header: address range ... path
                inside = line.rstrip().endswith(".arrow") and str(folder) in line
            elif inside and first == "Rss:":
                rss += int(line.split()[1]) * 1024
            elif inside and first == "Pss:":
                pss += int(line.split()[1]) * 1024
    return rss, pss


def first_step(prepared: Path, model: str, seq: int, work: Path, steps: int = 5, ranks: int = 2) -> dict:
    """Launch `ranks` ranks on the prepared corpus; seconds until the first step, the ranks' peak PSS,
    and how much of the shards they have mapped at the first step (RSS) and what that costs them (PSS)."""
    import psutil

    deepspeed = Path(sys.executable).parent / "deepspeed"
    out = work / "run"
    cmd = [
        str(deepspeed),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "bertscale/cli.py",
        "pretrain",
        "--prepared-data",
        str(prepared),
        "--model",
        model,
        "--max-seq-length",
        str(seq),
        "--micro-batch-size",
        "16",
        "--max-steps",
        str(steps),
        "--log-every",
        "1",
        "--save-every",
        "0",
        "--max-eval-samples",
        "64",
        "--ds-config",
        "zero2",
        "--dataloader-workers",
        "0",  # one rank alone would otherwise get a loader worker that two ranks on 2 cores do not
        "--wandb-mode",
        "disabled",
        "--output-dir",
        str(out),
        "--overwrite-output-dir",
    ]
    env = {**os.environ, **ENV}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreeMemory(proc.pid)
    first, lines, shards = None, [], []
    for line in proc.stdout:
        lines.append(line)
        if first is None and "[bertscale] step 1/" in line:
            first = time.perf_counter() - started
            procs = [
                p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())
            ]
            shards = [mapped_memory(p.pid, prepared) for p in procs]
    proc.wait()
    memory.stop()
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(lines[-40:])}")
    peaks = sorted(pss for pss, cmd in memory.peak_by_pid.values() if "--local_rank" in cmd)
    assert len(peaks) == ranks, peaks
    return {
        "first_step_s": first,
        "rank_pss": peaks,
        "ranks_sum": memory.peak_ranks,  # the peak of the sum (each rank's own peak may come at another time)
        "shards_rss": [r for r, _ in shards],
        "shards_pss": [p for _, p in shards],
    }


def model_state_bytes(model: str) -> int:
    """What one rank holds for the model in fp32 with Adam: weights, gradients and two moments
    (16 bytes a parameter; ZeRO-2 splits part of it across ranks, so this is the most a rank holds)."""
    from transformers import BertForPreTraining

    from bertscale import models

    return 16 * sum(p.numel() for p in BertForPreTraining(models.load_config(model)).parameters())


def second_rank_report(results: list[dict], model: str) -> None:
    """What a second rank adds to one, at the smallest and the largest corpus, and how much of the
    data's growth it adds: 1.0x the one rank's growth means no copy of the data per rank."""
    rows = [r for r in results if "one_rank_pss" in r]
    if not rows:
        return
    model_mb = model_state_bytes(model) / MB
    print(f"\none rank alone against two ranks (peak PSS, MB); the model's fp32 + Adam state: {model_mb:.1f} MB")
    for r in rows:
        one, two = r["one_rank_pss"] / MB, r["ranks_sum"] / MB
        print(
            f"  {r['mb']:.0f} MB of text: one rank {one:.0f}, two ranks {two:.0f} ({two / one:.2f}x); the second "
            f"rank adds {two - one:.0f}; 1.3x one rank + the model = {1.3 * one + model_mb:.0f}: "
            + ("holds" if two <= 1.3 * one + model_mb else "does not hold")
        )
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        grow_one = (big["one_rank_pss"] - small["one_rank_pss"]) / MB
        grow_two = (big["ranks_sum"] - small["ranks_sum"]) / MB
        print(
            f"  from {small['mb']:.0f} to {big['mb']:.0f} MB of text: one rank grows by {grow_one:.0f} MB, two ranks "
            f"together by {grow_two:.0f} MB (2.0x would be a copy of the data per rank)"
            + (f": {grow_two / grow_one:.2f}x" if grow_one > 0 else "")
        )


# --- report ------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[10, 40, 160], help="Corpus sizes in MB.")
    ap.add_argument("--model", default="tiny", help="Model whose tokenizer prepares (and that trains).")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="--preprocessing-workers (default: cores).")
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2, help="Prepare each size this many times (alternating).")
    ap.add_argument("--no-train", action="store_true", help="Skip the 2-rank first-step measurement.")
    ap.add_argument(
        "--no-one-rank",
        action="store_true",
        help="Skip launching one rank alone at the smallest and largest size (what a second rank adds).",
    )
    ap.add_argument("--no-warmup", action="store_true", help="Do not launch once before timing the first step.")
    ap.add_argument("--work-dir", default=None, help="Where corpora and prepared data go (default: a temp dir).")
    ap.add_argument("--json", default=None, help="Also write the results here.")
    args = ap.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pretrain_data_scaling_"))
    # DeepSpeed builds its CPU ops (shm allreduce, Adam) on first use, for minutes; keep them in this
    # venv so that other checkouts building theirs do not make every launch rebuild, and build them
    # once before timing (--no-warmup to time a cold start).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    sources = source_texts()
    results = []
    try:
        corpora = []
        for size in args.sizes:
            corpus = work / f"corpus-{size:g}MB"
            corpora.append((corpus, build_corpus(corpus, size, sources) / MB, work / f"prepared-{size:g}MB"))
        # every size prepared --repeat times, the sizes alternating so that a busy spell of a shared
        # machine hits them alike; each size keeps its fastest run
        runs = [[] for _ in corpora]
        for _ in range(args.repeat):
            for (corpus, _mb, prepared), done in zip(corpora, runs):
                shutil.rmtree(prepared, ignore_errors=True)
                done.append(run_prepare(corpus, prepared, args.model, args.workers, args.max_seq_length))
        for i, ((corpus, mb, prepared), done) in enumerate(zip(corpora, runs)):
            row = {"mb": mb, **min(done, key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in done]}
            if not args.no_train:
                if i == 0 and not args.no_warmup:
                    first_step(prepared, args.model, args.max_seq_length, work, steps=1)
                row.update(first_step(prepared, args.model, args.max_seq_length, work))
                if not args.no_one_rank and i in (0, len(corpora) - 1):
                    alone = first_step(prepared, args.model, args.max_seq_length, work, ranks=1)
                    row.update(one_rank_pss=alone["ranks_sum"], one_rank_first_step_s=alone["first_step_s"])
            results.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            shutil.rmtree(corpus)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nprepare with {args.workers} workers, --model {args.model}, seq {args.max_seq_length}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"prepare s: the fastest of {args.repeat}; worker s/MB: the workers' own seconds per MB of text")
    header = f"{'text MB':>8} {'prepare s':>10} {'MB/s':>6} {'CPU s':>7} {'MB/CPU-s':>9} {'worker s/MB':>12} "
    header += f"{'peak PSS MB':>12} "
    header += f"{'disk MB':>8} {'shards':>7} {'pairs':>9}"
    if not args.no_train:
        header += f" {'first step s':>13} {'rank PSS MB':>12} {'sum MB':>7} {'shards RSS/PSS MB':>18}"
    print(header)
    for r in results:
        line = f"{r['mb']:>8.1f} {r['seconds']:>10.1f} {r['mb'] / r['seconds']:>6.2f} {r['cpu_seconds']:>7.0f} "
        line += f"{r['mb'] / r['cpu_seconds']:>9.2f} {r['shard_seconds'] / r['mb']:>12.2f} "
        line += f"{r['peak_pss'] / MB:>12.0f} {r['disk'] / MB:>8.1f} "
        line += f"{r['shards']:>7} {r['pairs']:>9}"
        if "first_step_s" in r:
            ranks = "+".join(f"{p / MB:.0f}" for p in r["rank_pss"])
            shards = "+".join(f"{a / MB:.0f}/{b / MB:.0f}" for a, b in zip(r["shards_rss"], r["shards_pss"]))
            line += f" {r['first_step_s']:>13.1f} {ranks:>12} {r['ranks_sum'] / MB:>7.0f} {shards:>18}"
        print(line)
    print()
    for small, big in itertools.pairwise(results):
        print(
            f"{big['mb']:.0f} MB vs {small['mb']:.0f} MB ({big['mb'] / small['mb']:.0f}x the text): wall time "
            f"{big['seconds'] / small['seconds']:.2f}x, CPU time {big['cpu_seconds'] / small['cpu_seconds']:.2f}x, "
            f"workers' time {big['shard_seconds'] / small['shard_seconds']:.2f}x"
        )
    first, big = results[0], results[-1]
    print(f"peak memory {big['mb']:.0f} MB vs {first['mb']:.0f} MB: {big['peak_pss'] / first['peak_pss']:.2f}x")
    rate, cpu_rate = big["mb"] / big["seconds"], big["mb"] / big["cpu_seconds"]
    print(
        f"10 GB: {10240 / rate / 3600:.1f} h at this run's {rate:.2f} MB/s with {args.workers} workers; "
        f"{10240 / cpu_rate / 3600:.1f} CPU-hours (/ cores for a quiet machine), "
        f"{big['disk'] / big['mb'] * 10240 / 2**30:.1f} GB on disk, peak memory as at {big['mb']:.0f} MB "
        f"({big['peak_pss'] / MB:.0f} MB)"
    )
    second_rank_report(results, args.model)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()

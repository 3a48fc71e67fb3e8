"""Check `bertscale plan`'s activation formula against a measured training step.

For each model, micro batch and sequence length: builds BERT with a SQuAD head (sdpa attention,
random weights: memory does not depend on them), runs forward + backward with and without
activation checkpointing, and prints the estimate, the measured peak and their ratio.

    python benchmarks/activation_memory.py                        # CPU, fp32: tiny and MiniLM, b16 s384
    python benchmarks/activation_memory.py --device cuda --precision fp16 \\
        --models bert-base-uncased,bert-large-uncased --batches 8,16

On CPU the peak comes from torch.profiler (about a minute for MiniLM at b16 s384 on 2 cores);
on CUDA from the caching allocator's peak counter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_inputs import resolve  # noqa: E402  (benchmarks/ is on sys.path: this script's folder)

from bertscale import memory_model, models  # noqa: E402
from bertscale.plan import load_model_config  # noqa: E402


def build(name: str, task: str, device: str, precision: str):
    import torch
    from transformers import BertForQuestionAnswering

    from bertscale.tasks.pretraining_model import BertForPreTrainingOnMasked

    config = load_model_config(resolve(name))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = (BertForPreTrainingOnMasked if task == "pretrain" else BertForQuestionAnswering)(config)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    return model.to(device=device, dtype=dtype), config


def measure(
    name: str,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
    task: str = "squad",
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[int, int]:
    """(estimated, measured) peak activation bytes of one training step."""
    model, config = build(name, task, device, precision)
    if checkpointing:
        models.enable_activation_checkpointing(model)
    head = "masked_lm" if task == "pretrain" else "span"
    batch = memory_model.synthetic_batch(config, seq_len, micro_batch, head, device)
    measured = memory_model.measure_step_peak(model, batch)
    kernels = memory_model.CUDA if device.startswith("cuda") else memory_model.CPU
    masked = int((batch["labels"] != -100).sum()) if task == "pretrain" else None
    est = memory_model.estimate(
        memory_model.BertShape.of(config), seq_len, micro_batch, precision, kernels, head, masked_tokens=masked
    )
    return est.peak(checkpointing), measured


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,minilm", help="Comma-separated: tiny, minilm, a preset, a dir.")
    ap.add_argument("--batches", default="16", help="Comma-separated micro batch sizes.")
    ap.add_argument("--seq-lens", default="384", help="Comma-separated sequence lengths.")
    ap.add_argument("--task", default="squad", choices=("squad", "pretrain"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)
    print(f"{'model':<22}{'seq':>5}{'batch':>6}{'ckpt':>5}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>7}")
    worst = 1.0
    for name in args.models.split(","):
        for seq_len in map(int, args.seq_lens.split(",")):
            for batch in map(int, args.batches.split(",")):
                for ckpt in (False, True):
                    est, got = measure(name, seq_len, batch, ckpt, args.task, args.device, args.precision)
                    worst = max(worst, est / got, got / est)
                    print(
                        f"{name[:21]:<22}{seq_len:>5}{batch:>6}{'on' if ckpt else 'off':>5}"
                        f"{est / 2**20:>14.1f}{got / 2**20:>14.1f}{est / got:>7.3f}",
                        flush=True,
                    )
    print(f"largest deviation: {worst - 1:.1%}")


if __name__ == "__main__":
    main()

"""MLM head on masked positions only against the stock BertForPreTraining, side by side.

    python benchmarks/mlm_head.py                      # MiniLM, seq 128, micro batch 32, CPU
    python benchmarks/mlm_head.py --model tiny --device cuda --precision bf16

Both models hold the same weights and train on the same masked batches (every 7th token, about
what 15% masking gives), alternating step by step so machine noise hits both alike. Prints the
median step time (forward + backward), the peak activation memory of one step, the ratio, and
the largest loss difference (which should be rounding only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from activation_memory import load_model_config
from bench_inputs import resolve
from transformers import BertForPreTraining

from bertscale import memory_model
from bertscale.tasks.pretraining_model import BertForPreTrainingOnMasked


def step_seconds(model, batch) -> tuple[float, float]:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss.detach().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="tiny, minilm, a preset or a model dir")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)

    config = load_model_config(resolve(args.model))
    config._attn_implementation = "sdpa"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    torch.manual_seed(0)
    stock = BertForPreTraining(config)
    ours = BertForPreTrainingOnMasked(config)
    ours.load_state_dict(stock.state_dict())
    models = {"stock (all positions)": stock, "bertscale (masked only)": ours}
    for m in models.values():
        m.to(device=args.device, dtype=dtype).train()
        m.tie_weights()

    times = {name: [] for name in models}
    loss_diff = 0.0
    for step in range(args.steps + 1):  # step 0 warms up both and is not timed
        batch = memory_model.synthetic_batch(config, args.seq_len, args.micro_batch, "pretrain", args.device, seed=step)
        losses = []
        for name, m in models.items():
            torch.manual_seed(step)  # the same dropout masks for both
            m.zero_grad(set_to_none=True)
            seconds, loss = step_seconds(m, batch)
            losses.append(loss)
            if step:
                times[name].append(seconds)
        loss_diff = max(loss_diff, abs(losses[0] - losses[1]))

    batch = memory_model.synthetic_batch(config, args.seq_len, args.micro_batch, "pretrain", args.device)
    peaks = {name: memory_model.measure_step_peak(m, batch) for name, m in models.items()}
    print(
        f"{args.model}, seq {args.seq_len}, micro batch {args.micro_batch}, {args.precision} on {args.device}, "
        f"{args.steps} alternating steps"
    )
    print(f"{'':<26}{'median step s':>14}{'peak activations MiB':>22}")
    for name in models:
        print(f"{name:<26}{statistics.median(times[name]):>14.3f}{peaks[name] / 2**20:>22.1f}")
    (s_name, o_name) = models
    print(
        f"speedup {statistics.median(times[s_name]) / statistics.median(times[o_name]):.2f}x, "
        f"activation memory {peaks[o_name] / peaks[s_name]:.2f}x, largest loss difference {loss_diff:.2e}"
    )


if __name__ == "__main__":
    main()

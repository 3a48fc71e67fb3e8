"""Evaluation: the loop every rank runs (in training and in `bertscale evaluate`), and that command."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from . import data, models, tasks
from . import distributed as dist
from . import engine as engines
from .errors import UserError
from .files import write_json_atomic


def evaluate(model, task, eval_set, batch_size: int, output_dir: Path | None) -> dict:
    """Forward the eval features on all ranks, gather per-row outputs on rank 0, compute metrics
    there and share them with every rank (early stopping needs them everywhere)."""
    feats = eval_set.features
    if output_dir is not None and dist.is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    batches = data.eval_batches(task.lengths(feats), batch_size, dist.world_size(), dist.rank())
    filler = batches[0] if batches and batches[0] else [0]
    mine: dict[str, list] = {}
    index: list[int] = []
    model.eval()
    with torch.no_grad():
        for ids in batches:
            batch = task.collate(data.rows_of(feats, ids or filler))
            out = model(**model_inputs(batch, task, model.device))
            if not ids:
                continue  # a filler pass keeps ZeRO-3 collectives in step across ranks
            for k, v in task.eval_outputs(out, batch).items():
                mine.setdefault(k, []).extend(v)
            index.extend(ids)
    model.train()
    gathered = dist.gather_objects((index, mine))
    metrics = None
    if dist.is_main():
        metrics = task.compute_metrics(eval_set, _in_feature_order(gathered), output_dir)
    return dist.broadcast_object(metrics)


def _in_feature_order(gathered) -> dict[str, list]:
    """Every rank's (row ids, outputs) as one dict of outputs in row order."""
    order = np.argsort([i for idx, _ in gathered for i in idx], kind="stable")
    outputs = {k: [v for _, part in gathered for v in part.get(k, [])] for k in gathered[0][1]}
    return {k: [v[i] for i in order] for k, v in outputs.items()}


def model_inputs(batch: dict, task, device) -> dict:
    """What the model takes from the batch (inputs and labels), tensors on its device. For an
    unpadded model (task.packing set) also where the real tokens are, computed here on the CPU
    unless the batch has it already (unpad.add_packing); `max_seqlen` stays a Python int."""
    wanted = set(task.model_input_names) | set(task.label_names())
    if task.packing is not None:
        from .unpad import PACKING_KEYS, add_packing

        if "cu_seqlens" not in batch:
            batch = add_packing(dict(batch), **task.packing)
        wanted |= set(PACKING_KEYS)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items() if k in wanted}


def evaluate_model(run) -> dict:
    """`bertscale evaluate`: score an exported model on an eval set, no training, no optimizer;
    unpadded as in training unless --no-unpad."""
    from .unpad import packing_options

    dist.setup()
    tokenizer = models.load_tokenizer(run.model.model)
    config = models.load_config(run.model.model)
    task = tasks.resolve(run.task).for_model(tokenizer, config, **tasks.settings(run))
    eval_set = dist.main_first(task.eval_set)
    if eval_set is None:
        raise UserError(f"--task {run.task}: no evaluation data; pass --eval-file (or --dataset)")
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    model = engines.choose_model_class(run.model, task, config).from_pretrained(run.model.model).to(device)
    task.packing = packing_options(model)
    engines.log_attention_kernel(model, device, "fp32", training=False)
    out = run.out
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    metrics = evaluate(model, task, eval_set, run.eval.eval_batch_size, out)
    if dist.is_main():
        write_json_atomic(out / "eval_results.json", metrics)
        print(
            "[bertscale] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))),
            file=sys.stderr,
        )
        print(f"[bertscale] wrote {out / 'eval_results.json'}", file=sys.stderr)
    return metrics

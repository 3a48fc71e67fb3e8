"""The training loop: task-agnostic, flat, readable (nanoGPT style).

setup -> resume -> for each step: forward, backward, step, log, evaluate, save, stop on signal
-> final checkpoint, export of the best/last model to final/, eval_results.json.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, distributed as dist, engine as engines, models, tasks
from .config import RunConfig, write_json_atomic
from .errors import PreemptedExit, UserError
from .tracking import LossScaleWatchdog, Throughput, Tracker, memory_stats, peak_tflops


class StopFlag:
    """SIGTERM/SIGUSR1 (Slurm preemption) and a first SIGINT ask for a save at the next step
    boundary; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"[bertscale] rank {dist.rank()}: got {signal.Signals(signum).name}, "
              "saving a checkpoint at the next step boundary", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(run: RunConfig, task_name: str) -> None:
    """Refuse to mix runs: checkpoints of another model/task in the output dir are not resumed."""
    out = Path(run.output_dir)
    prev_file = out / "run_config.json"
    if run.overwrite_output_dir or run.resume == "none" or not checkpoint.latest(out):
        return
    if prev_file.is_file():
        prev = json.loads(prev_file.read_text()).get("run", {})
        for key, now in (("model", run.model), ("task", task_name)):
            if prev.get(key) != now:
                raise UserError(f"{out} holds checkpoints of another run ({key} {prev.get(key)!r}, this run "
                                f"{now!r}); use another --output-dir, or --overwrite-output-dir to start over")


def prepare_output_dir(run: RunConfig, task_name: str, ds_cfg: dict) -> None:
    """Only called after every input was validated, so a bad run never touches the dir."""
    out = Path(run.output_dir)
    if dist.is_main():
        if run.overwrite_output_dir:
            for name in ("checkpoints", "final", "metrics.jsonl", "wandb_run_id.txt", "eval_results.json"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "run_config.json", {"run": {**run.to_json(), "task": task_name},
                                                    "deepspeed": ds_cfg, "world_size": dist.world_size()})
    dist.barrier()


def evaluate(engine, task, eval_set, run: RunConfig, output_dir: Path | None) -> dict:
    """Forward the eval features on all ranks, gather per-row outputs on rank 0, compute metrics
    there and share them with every rank (early stopping needs them everywhere)."""
    feats = eval_set.features
    lengths = task.lengths(feats)
    batches = data.eval_batches(lengths, run.eval_batch_size, dist.world_size(), dist.rank())
    filler = batches[0] if batches and batches[0] else [0]
    mine: dict[str, list] = {}
    index: list[int] = []
    engine.eval()
    with torch.no_grad():
        for ids in batches:
            batch = task.collate(rows_of(feats, ids or filler))
            out = engine(**_to_device(batch, engine.device, task))
            if not ids:
                continue  # a filler pass keeps ZeRO-3 collectives in step across ranks
            for k, v in task.eval_outputs(out, batch).items():
                mine.setdefault(k, []).extend(v)
            index.extend(ids)
    engine.train()
    gathered = dist.gather_objects((index, mine))
    metrics = None
    if dist.is_main():
        all_index = [i for idx, _ in gathered for i in idx]
        order = np.argsort(all_index, kind="stable")
        outputs = {k: [v for _, part in gathered for v in part.get(k, [])] for k in gathered[0][1]}
        outputs = {k: [v[i] for i in order] for k, v in outputs.items()}
        metrics = task.compute_metrics(eval_set, outputs, output_dir)
    return dist.broadcast_object(metrics)


def rows_of(dataset, ids) -> list[dict]:
    cols = dataset[ids]  # one columnar read is much faster than len(ids) row reads
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _to_device(batch: dict, device, task) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in task.model_input_names or k in task.label_names()}


def _improved(task, new, best) -> bool:
    return best is None or (new > best if task.greater_is_better else new < best)


def train(run: RunConfig, task_name: str) -> dict:
    dist.setup()
    world, rank = dist.world_size(), dist.rank()
    check_output_dir(run, task_name)
    engines.resolve_config(run, world, total_steps=1)  # fail on a bad config before any slow work
    seed_everything(run.seed)

    tokenizer = models.load_tokenizer(run.model)
    task = tasks.get(task_name)(run, tokenizer)
    train_feats, eval_set = dist.main_first(lambda: (task.train_features(), task.eval_set()))
    lengths = task.lengths(train_feats)
    batches_per_epoch = len(train_feats) // (run.micro_batch_size * world)
    steps_per_epoch = batches_per_epoch // run.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_feats)} training rows are fewer than one global batch "
                        f"(micro {run.micro_batch_size} x accumulation {run.grad_accum} x {world} ranks)")
    total_steps = run.max_steps if run.max_steps > 0 else math.ceil(run.epochs * steps_per_epoch)

    engine, ds_cfg = engines.build(run, task, world, total_steps)
    prepare_output_dir(run, task_name, ds_cfg)
    out = Path(run.output_dir)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": None, "best_tag": None,
             "evals_without_improvement": 0, "model": run.model, "task": task_name}
    resume_from = checkpoint.resolve_resume(run)
    if resume_from is not None:
        state.update(checkpoint.load(engine, resume_from))
        if dist.is_main():
            print(f"[bertscale] Resumed from {resume_from} (step {state['step']})", file=sys.stderr, flush=True)

    tracker = Tracker(run, ds_cfg, total_steps, resumed=resume_from is not None)
    speed = Throughput(engine.module.config, peak_tflops(run.peak_tflops), world)
    watchdog = LossScaleWatchdog(ds_cfg)
    stop = StopFlag()
    if dist.is_main():
        print(f"[bertscale] {task_name}: {len(train_feats)} training rows, {world} ranks, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, precision {engines.ds_config.precision_of(ds_cfg)}, "
              f"ZeRO-{engines.zero_stage(ds_cfg)}", file=sys.stderr, flush=True)

    def save(protect=None):
        return checkpoint.save(engine, out, state, tokenizer, run.keep, protect=protect or state["best_tag"])

    def run_eval():
        metrics = evaluate(engine, task, eval_set, run, out)
        tracker.log(state["step"], {"eval": 1, **{f"eval_{k}": v for k, v in metrics.items()
                                                  if isinstance(v, (int, float))}})
        value = metrics.get(task.main_metric)
        if value is not None and _improved(task, value, state["best_metric"]):
            state.update(best_metric=value, evals_without_improvement=0, best_tag=f"step-{state['step']}",
                         best_eval=metrics)
            save()
        else:
            state["evals_without_improvement"] += 1
        return metrics

    loss_sum, loss_count, parts_sum = 0.0, 0, {}
    skipped_before = engine.skipped_steps
    early_stopped = False
    while state["step"] < total_steps and not early_stopped:
        batches = data.train_batches(lengths, run.micro_batch_size, world, rank, run.seed, state["epoch"],
                                     run.group_by_length)
        for i in range(state["batch_in_epoch"], len(batches)):
            batch = task.collate(rows_of(train_feats, batches[i]))
            speed.add(batch)
            output = engine(**_to_device(batch, engine.device, task))
            engine.backward(output.loss)
            engine.step()
            state["batch_in_epoch"] = i + 1
            loss_sum += output.loss.item()
            loss_count += 1
            for k, v in task.loss_parts(output, batch).items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            if engine.global_steps == state["step"]:
                continue  # inside gradient accumulation
            state["step"] = engine.global_steps
            step = state["step"]

            skipped = engine.skipped_steps > skipped_before
            skipped_before = engine.skipped_steps
            scale = engine.optimizer.loss_scale if watchdog.enabled else None
            problem = watchdog.check(scale, skipped)
            if step % run.log_every == 0 or step == total_steps or problem:
                row = {"epoch": state["epoch"] + (i + 1) / len(batches), "loss": loss_sum / loss_count,
                       "lr": engine.get_lr()[0], "skipped_steps": engine.skipped_steps,
                       **{k: v / loss_count for k, v in parts_sum.items()}, **speed.report(), **memory_stats()}
                if scale is not None:
                    row["loss_scale"] = float(scale)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                tracker.log(step, row)
                loss_sum, loss_count, parts_sum = 0.0, 0, {}
            if problem:
                save()
                tracker.finish()
                raise UserError(problem)
            if eval_set is not None and run.eval_every and step % run.eval_every == 0 and step < total_steps:
                run_eval()
                if run.early_stopping_patience and state["evals_without_improvement"] >= run.early_stopping_patience:
                    tracker.log(step, {"early_stopped": 1})
                    if dist.is_main():
                        print(f"[bertscale] early stopping: {run.early_stopping_patience} evaluations without "
                              f"improvement of {task.main_metric}", file=sys.stderr)
                    early_stopped = True
                    break
            if run.save_every and step % run.save_every == 0:
                save()
            if dist.any_rank(stop.requested):
                save()
                tracker.finish()
                if dist.is_main():
                    print(f"[bertscale] checkpoint saved at step {step}; exiting with code {PreemptedExit.CODE} "
                          "so the job can be requeued", file=sys.stderr, flush=True)
                raise PreemptedExit()
            if step >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    final_metrics = {}
    if eval_set is not None and not early_stopped and state.get("best_tag") != f"step-{state['step']}":
        final_metrics = run_eval()
    last = save()
    best_tag = state["best_tag"] if state["best_tag"] else last.name
    final_metrics = state.get("best_eval", final_metrics) if state["best_tag"] else final_metrics
    if dist.is_main():
        source = checkpoint.root(out) / best_tag
        checkpoint.export(source, out / "final")
        task.save_extra(out / "final")
        if final_metrics:
            write_json_atomic(out / "eval_results.json", {**final_metrics, "step": _step_of(best_tag)})
        print(f"[bertscale] exported {source.name} to {out / 'final'}", file=sys.stderr)
        if final_metrics:
            print("[bertscale] final: " + " ".join(f"{k}={v:.4g}" for k, v in final_metrics.items()
                                                  if isinstance(v, (int, float))), flush=True)
    tracker.summary({**{f"final_{k}": v for k, v in final_metrics.items() if isinstance(v, (int, float))},
                     "best_metric": state["best_metric"], "steps": state["step"]})
    tracker.finish()
    dist.barrier()
    return final_metrics


def _step_of(tag: str) -> int:
    return int(tag.split("-")[1])

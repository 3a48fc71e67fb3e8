"""The training loop: task-agnostic, flat, readable (nanoGPT style).

setup -> resume -> for each step: forward, backward, step, log, evaluate, save, stop on signal
-> final checkpoint, export of the best/last model to final/, eval_results.json.
"""
from __future__ import annotations

import json
import math
import os
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
from .tracking import LossScaleWatchdog, Throughput, Tracker, memory_stats, peak_tflops, redact_secrets


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


def prepare_output_dir(run: RunConfig, task_name: str, ds_cfg: dict) -> None:
    """Only called after every input was validated, so a bad run never touches the dir."""
    out = Path(run.output_dir)
    if dist.is_main():
        if run.overwrite_output_dir:
            for name in ("checkpoints", "final", "evals", "metrics.jsonl", "wandb_run_id.txt", "eval_results.json",
                     "predictions.json", "null_odds.json", "predictions.jsonl"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "run_config.json", {"run": {**run.to_json(), "task": task_name},
                                                    "deepspeed": redact_secrets(ds_cfg),
                                                    "world_size": dist.world_size()})
    dist.barrier()


def evaluate(engine, task, eval_set, run: RunConfig, output_dir: Path | None) -> dict:
    """Forward the eval features on all ranks, gather per-row outputs on rank 0, compute metrics
    there and share them with every rank (early stopping needs them everywhere)."""
    feats = eval_set.features
    lengths = task.lengths(feats)
    if output_dir is not None and dist.is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
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


def epoch_batches(train_feats, lengths, run, world, rank, epoch, start):
    """(batch index, rows, batches in epoch or None) for this rank, from batch `start` on."""
    if lengths is None:
        for i, rows in data.stream_batches(train_feats, run.micro_batch_size, world, rank, run.seed, epoch, start):
            yield i, rows, None
        return
    batches = data.train_batches(lengths, run.micro_batch_size, world, rank, run.seed, epoch, run.group_by_length)
    for i in range(start, len(batches)):
        yield i, rows_of(train_feats, batches[i]), len(batches)


def rows_of(dataset, ids) -> list[dict]:
    cols = dataset[ids]  # one columnar read is much faster than len(ids) row reads
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _to_device(batch: dict, device, task) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in task.model_input_names or k in task.label_names()}


def _improved(greater_is_better: bool, new, best) -> bool:
    return best is None or (new > best if greater_is_better else new < best)


def train(run: RunConfig, task_name: str) -> dict:
    dist.setup()
    stop = StopFlag()  # from the start, so a preemption during set-up still ends in a requeue
    world, rank = dist.world_size(), dist.rank()
    resume_from = checkpoint.plan_resume(run, task_name)  # refuses mixed runs before anything is written
    engines.resolve_config(run, world, total_steps=1)  # fail on a bad config before any slow work
    seed_everything(run.seed)

    tokenizer = models.load_tokenizer(run.model)
    task = tasks.get(task_name)(run, tokenizer)
    train_feats, eval_set = dist.main_first(lambda: (task.train_features(), task.eval_set()))
    if data.is_streaming(train_feats):
        if run.max_steps <= 0:
            raise UserError("--streaming: a stream has no length, so --epochs cannot be counted; pass --max-steps")
        lengths, steps_per_epoch, total_steps = None, "?", run.max_steps
    else:
        lengths = task.lengths(train_feats)
        steps_per_epoch = len(train_feats) // (run.micro_batch_size * world) // run.grad_accum
        if steps_per_epoch == 0:
            raise UserError(f"{len(train_feats)} training rows are fewer than one global batch "
                            f"(micro {run.micro_batch_size} x accumulation {run.grad_accum} x {world} ranks)")
        total_steps = run.max_steps if run.max_steps > 0 else math.ceil(run.epochs * steps_per_epoch)

    engine, ds_cfg = engines.build(run, task, world, total_steps)
    out = Path(run.output_dir)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": None, "best_tag": None,
             "evals_without_improvement": 0, "model": run.model, "task": task_name}
    if resume_from is not None:
        state.update(checkpoint.load(engine, resume_from))
        if dist.is_main():
            print(f"[bertscale] Resumed from {resume_from} (step {state['step']})", file=sys.stderr, flush=True)
    prepare_output_dir(run, task_name, ds_cfg)  # after the load: a checkpoint that fails to load changes nothing

    tracker = Tracker(run, ds_cfg, total_steps, start_step=state["step"])
    speed = Throughput(engine.module.config, peak_tflops(run.peak_tflops), world)
    watchdog = LossScaleWatchdog(ds_cfg, engine.optimizer)
    if dist.is_main():
        print(f"[bertscale] {task_name}: {'streamed' if lengths is None else len(train_feats)} training rows, {world} ranks, "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, precision {engines.ds_config.precision_of(ds_cfg)}, "
              f"ZeRO-{engines.zero_stage(ds_cfg)}", file=sys.stderr, flush=True)

    # final/ is the best evaluated model when the user asked for a best metric (or early stopping),
    # else the last one; its eval results and predictions are copied next to it.
    keep_best = bool(run.early_stopping_patience or run.metric_for_best)
    best_metric = run.metric_for_best or task.main_metric
    greater_is_better = task.greater_is_better if best_metric == task.main_metric else "loss" not in best_metric

    def save():
        with speed.paused():  # throughput counts training time only
            return checkpoint.save(engine, out, state, tokenizer, run.keep,
                                   protect=state["best_tag"] if keep_best else None)

    def run_eval():
        eval_dir = out / "evals" / f"step-{state['step']}"  # predictions of every evaluation are kept
        t = time.perf_counter()
        with speed.paused():
            metrics = evaluate(engine, task, eval_set, run, eval_dir)
        seconds = time.perf_counter() - t  # forward, gather, post-processing, metric, predictions file
        if dist.is_main():
            write_json_atomic(eval_dir / "eval_results.json", {**metrics, "step": state["step"]})
        state["last_eval_step"] = state["step"]
        tracker.log(state["step"], {"eval": 1, **{f"eval_{k}": v for k, v in metrics.items()
                                                  if isinstance(v, (int, float))},
                                    "eval_seconds": seconds,
                                    "eval_examples_per_s": task.eval_examples(eval_set) / seconds})
        value = metrics.get(best_metric)
        if value is not None and _improved(greater_is_better, value, state["best_metric"]):
            state.update(best_metric=value, evals_without_improvement=0, best_tag=f"step-{state['step']}")
            if keep_best:
                save()
        else:
            state["evals_without_improvement"] += 1
        return metrics

    if run.eval_on_start and eval_set is not None and state["step"] == 0:
        run_eval()
    engine.train()  # from_pretrained returns the model in eval mode: no dropout until this call
    loss_sum, loss_count, parts_sum = 0.0, 0, {}
    skipped_before = engine.skipped_steps
    early_stopped = False
    while state["step"] < total_steps and not early_stopped:
        for i, rows, n_batches in epoch_batches(train_feats, lengths, run, world, rank, state["epoch"],
                                                state["batch_in_epoch"]):
            batch = task.collate(rows)
            speed.add(batch)
            output = engine(**_to_device(batch, engine.device, task))
            engine.backward(output.loss)
            engine.step()
            state["batch_in_epoch"] = i + 1
            loss_sum += output.loss.detach()  # a tensor: no GPU sync until the next log line
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
                row = {"epoch": state["epoch"] + (i + 1) / (n_batches or float("inf")),
                       "loss": float(loss_sum) / loss_count,
                       "lr": engine.get_lr()[0], "skipped_steps": engine.skipped_steps,
                       **{k: float(v) / loss_count for k, v in parts_sum.items()}, **speed.report(), **memory_stats()}
                if scale is not None:
                    row["loss_scale"] = float(scale)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                tracker.log(step, row)
                loss_sum, loss_count, parts_sum = 0.0, 0, {}
            if problem:
                saved = save()
                tracker.finish()
                raise UserError(f"{problem} The run was checkpointed first: {saved}", echo=dist.is_main())
            if eval_set is not None and run.eval_every and step % run.eval_every == 0 and step < total_steps:
                run_eval()
                if run.early_stopping_patience and state["evals_without_improvement"] >= run.early_stopping_patience:
                    tracker.log(step, {"early_stopped": 1})
                    if dist.is_main():
                        print(f"[bertscale] early stopping: {run.early_stopping_patience} evaluations without "
                              f"improvement of {best_metric}", file=sys.stderr)
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

    if eval_set is not None and not early_stopped and state.get("last_eval_step") != state["step"]:
        run_eval()
    last = save()
    chosen = state["best_tag"] if keep_best and state["best_tag"] else last.name
    final_metrics = {}
    if dist.is_main():
        checkpoint.export(checkpoint.root(out) / chosen, out / "final")
        task.save_extra(out / "final")
        print(f"[bertscale] exported {chosen} to {out / 'final'}", file=sys.stderr)
        eval_dir = out / "evals" / chosen
        if eval_dir.is_dir():
            for f in eval_dir.iterdir():  # eval_results.json, predictions.json, ... of the exported model
                shutil.copyfile(f, out / f".{f.name}.tmp")
                os.replace(out / f".{f.name}.tmp", out / f.name)
            final_metrics = json.loads((out / "eval_results.json").read_text())
            print("[bertscale] final: " + " ".join(f"{k}={v:.4g}" for k, v in final_metrics.items()
                                                  if isinstance(v, (int, float))), flush=True)
    tracker.summary({**{f"final_{k}": v for k, v in final_metrics.items() if isinstance(v, (int, float))},
                     "best_metric": state["best_metric"], "steps": state["step"], **speed.summary()})
    tracker.finish()
    dist.barrier()
    return final_metrics

"""The training loop: task-agnostic, flat, readable (nanoGPT style).

train = setup (resume plan, config, data, engine, trackers) -> fit (the loop) -> finish (last
evaluation and checkpoint, export of the best or last model to final/, summary).
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, data, ds_config, loader, models, tasks
from . import distributed as dist
from . import engine as engines
from .args import Run
from .errors import PreemptedExit, UserError
from .evaluation import evaluate, model_inputs
from .files import copy_atomic, write_json_atomic
from .preemption import StopFlag
from .tracking import Throughput, Tracker, memory_stats, peak_tflops, redact_secrets
from .watchdog import LossScaleWatchdog

RUN_FILES = ("checkpoints", "final", "evals", "metrics.jsonl", "wandb_run_id.txt", "eval_results.json")


@dataclass
class TrainState:
    """What a checkpoint carries besides the engine: where training is, and the best model so far."""

    step: int = 0
    epoch: int = 0
    samples: int = 0  # trained in all
    samples_in_epoch: int = 0  # the data position: samples of this epoch's order already trained
    epoch_batch: int = 0  # the global batch this epoch's order was built with (data.py)
    best_metric: float | None = None
    best_tag: str | None = None
    evals_without_improvement: int = 0
    last_eval_step: int | None = None
    model: str = ""
    task: str = ""

    def update(self, saved: dict) -> None:
        names = {f.name for f in fields(self)}
        for k, v in saved.items():
            if k in names:
                setattr(self, k, v)

    def position_from_batches(self, saved: dict, micro: int, world: int) -> None:
        """A checkpoint written before positions were counted in samples holds `batch_in_epoch`, micro
        batches per rank in an order built in units of micro x ranks: the same position in samples."""
        if "samples_in_epoch" not in saved:
            self.epoch_batch = micro * world
            self.samples_in_epoch = int(saved.get("batch_in_epoch", 0)) * self.epoch_batch


@dataclass
class Training:
    """Everything fit() and finish() work with; built by setup()."""

    run: Run
    task: Any
    tokenizer: Any
    engine: Any
    ds_cfg: dict
    train_feats: Any
    lengths: list | None  # None for a stream
    split: data.Split  # micro batch x accumulation x ranks, and this rank
    eval_set: Any
    steps: data.StepPlan
    tracker: Tracker
    speed: Throughput
    watchdog: LossScaleWatchdog
    stop: StopFlag
    state: TrainState
    best_metric: str  # the metric that picks the best model
    keep_best: bool  # final/ is the best evaluated model (else the last one)
    collate: Any  # rows -> a model batch (the task's collate, plus packing for an unpadded model)
    loader_workers: int  # processes per rank building batches ahead (0: in the rank itself)
    pin_memory: bool
    early_stopped: bool = False
    loss: dict = field(default_factory=dict)  # sums since the last log line (tensors: no sync per step)


def train(run: Run) -> dict:
    t = setup(run)
    fit(t)
    return finish(t)


def setup(run: Run) -> Training:
    dist.setup()
    stop = StopFlag()  # from the start, so a preemption during set-up still ends in a requeue
    world = dist.world_size()
    run = replace(run, optim=data.with_global_batch(run.optim, world))  # --global-batch-size -> accumulation
    resume_from = checkpoint.plan_resume(run.ckpt, run.model.model, run.task)  # refuses mixed runs first
    ds_cfg = engines.resolve_config(run.optim, world)  # a bad config fails before any slow work
    seed_everything(run.optim.seed)

    tokenizer = models.load_tokenizer(run.model.model)
    task = tasks.build(run, tokenizer)
    # Every rank at once: preparing data may take hours, and the ranks wait for each other through files.
    note = task.prepare_train_data(dist.rank(), world)
    if note and dist.is_main():
        print(f"[bertscale] {note}", file=sys.stderr, flush=True)
    train_feats, eval_set = dist.main_first(lambda: (task.train_features(), task.eval_set()))
    lengths = None if data.is_streaming(train_feats) else task.lengths(train_feats)
    rows = None if lengths is None else len(lengths)
    steps = data.plan_steps(rows, run.optim, world, task.describe_train_data(rows) if rows is not None else "")
    ds_cfg = ds_config.fill_schedule(ds_cfg, run.optim, steps.total_steps)
    split = data.Split(run.optim.micro_batch_size, run.optim.grad_accum, world, dist.rank())
    universal = resume_from is not None and universal_resume(resume_from, ds_cfg, world, streaming=rows is None)

    engine = engines.build(run.model, run.optim.weight_decay, task, ds_cfg)
    engine.module.config.bertscale_task = run.task  # exported models say which task made them
    state = TrainState(model=run.model.model, task=run.task, epoch_batch=split.global_batch)
    if resume_from is not None:
        resume(engine, resume_from, universal, state, run.optim.seed, split)
    record = {"run": run.flags(), "deepspeed": redact_secrets(ds_cfg), "world_size": world}
    prepare_output_dir(run, task, record)  # after the load: a checkpoint that fails to load changes nothing

    keep_best = bool(run.eval.early_stopping_patience or run.eval.metric_for_best)
    t = Training(
        run=run,
        task=task,
        tokenizer=tokenizer,
        engine=engine,
        ds_cfg=ds_cfg,
        train_feats=train_feats,
        lengths=lengths,
        split=split,
        eval_set=eval_set,
        steps=steps,
        tracker=Tracker(run.log, run.out, record, steps.total_steps, start_step=state.step),
        speed=Throughput(engine.module.config, peak_tflops(run.log.peak_tflops), world),
        watchdog=LossScaleWatchdog(ds_cfg, engine.optimizer),
        stop=stop,
        state=state,
        best_metric=task.main_metric,
        keep_best=keep_best,
        collate=functools.partial(collate_batch, task),
        loader_workers=loader.default_workers(dist.local_world_size(), engine.device.type)
        if run.data.dataloader_workers is None
        else run.data.dataloader_workers,
        pin_memory=torch.cuda.is_available(),
    )
    if dist.is_main():
        print(
            f"[bertscale] {run.task}: {'streamed' if rows is None else rows} training rows, "
            f"{world} rank{'s' * (world != 1)}, {steps.steps_per_epoch or '?'} steps/epoch, "
            f"{steps.total_steps} steps, global batch {split.global_batch} ({split.micro} x {split.accum} x {world}), "
            f"precision {ds_config.precision_of(ds_cfg)}, ZeRO-{engines.zero_stage(ds_cfg)}",
            file=sys.stderr,
            flush=True,
        )
    return t


def universal_resume(ckpt: Path, ds_cfg: dict, world: int, streaming: bool) -> bool:
    """Whether resuming `ckpt` takes a universal checkpoint (another number of ranks, ZeRO stage or
    precision than it was written with, except a rank count under ZeRO stage 0, which loads as it is);
    if so, it is converted now (once, by rank 0)."""
    saved = checkpoint.read_state(ckpt)
    now = {"world_size": world, "zero_stage": engines.zero_stage(ds_cfg), "precision": ds_config.precision_of(ds_cfg)}
    if streaming and saved.get("world_size", world) != world:
        raise UserError(
            f"{ckpt} was written with {saved['world_size']} ranks and this run has {world}: a streamed data set "
            "is read as one shard per rank, so its position cannot carry over to another number of ranks. "
            f"Resume with {saved['world_size']} ranks, or continue from its weights: bertscale export "
            f"--checkpoint {ckpt} --output W, then train with --model W in a new --output-dir",
            echo=dist.is_main(),
        )
    if checkpoint.loads_directly(saved, now):
        return False
    checkpoint.check_universal_target(ckpt, saved, now["zero_stage"], now["precision"])
    checkpoint.prepare_universal(ckpt)
    return True


def resume(engine, ckpt: Path, universal: bool, state: TrainState, seed: int, split: data.Split) -> None:
    """Load `ckpt` into the engine and `state`, and say so in one log line: what changed (through a
    universal checkpoint), and where the data continues when the global batch changed."""
    saved = checkpoint.read_state(ckpt)
    if universal:
        loaded, what = checkpoint.load_universal(engine, ckpt, seed)
    else:
        loaded, what = checkpoint.load(engine, ckpt, seed)
    state.update(loaded)
    state.position_from_batches(loaded, split.micro, saved.get("world_size", split.world))
    if "samples" not in loaded:
        state.samples = int(engine.global_samples)  # DeepSpeed counts them too
    line = f"[bertscale] Resumed from {ckpt} (step {state.step})"
    if universal:
        line += f" through a universal checkpoint: {what}"
    elif what:  # another rank count under ZeRO stage 0
        line += f": {what}"
    before = saved.get("global_batch")
    if before and before != split.global_batch:
        line += (
            f"; global batch {before} -> {split.global_batch}: training continues from sample {state.samples} "
            f"(sample {state.samples_in_epoch} of epoch {state.epoch}), the learning-rate schedule from step "
            f"{state.step}"
        )
    if dist.is_main():
        print(line, file=sys.stderr, flush=True)


def fit(t: Training) -> None:
    run, state, engine, task = t.run, t.state, t.engine, t.task
    if run.eval.eval_on_start and t.eval_set is not None and state.step == 0:
        run_eval(t)
    engine.train()  # from_pretrained returns the model in eval mode: no dropout until this call
    skipped_before = engine.skipped_steps
    while state.step < t.steps.total_steps and not t.early_stopped:
        # batches built (rows read, collated, packed, pinned) ahead of the step, in worker processes
        position = (state.samples_in_epoch, state.epoch_batch)
        batches = loader.train_epoch(
            t.train_feats,
            t.lengths,
            t.split,
            run.optim.seed,
            state.epoch,
            position,
            run.data.group_by_length,
            t.collate,
            t.loader_workers,
            pin_memory=t.pin_memory,
        )
        for batch, epoch_samples in batches:
            # forward, backward and step: DeepSpeed accumulates and steps every grad_accum micro batches
            t.speed.add(batch)
            inputs = model_inputs(batch, task, engine.device)
            output = engine(**inputs)
            loss = task.loss(output, inputs)
            engine.backward(loss)
            engine.step()
            add_losses(t.loss, loss, task.loss_parts(output, batch))
            if engine.global_steps == state.step:
                continue  # inside gradient accumulation
            state.step = step = engine.global_steps
            state.samples += t.split.global_batch
            state.samples_in_epoch += t.split.global_batch

            # log; an fp16 run whose loss scale collapsed stops here, after a checkpoint
            skipped, skipped_before = engine.skipped_steps > skipped_before, engine.skipped_steps
            scale = engine.optimizer.loss_scale if t.watchdog.enabled else None
            problem = t.watchdog.check(scale, skipped)
            if step % run.log.log_every == 0 or step == t.steps.total_steps or problem:
                log_training(t, state.epoch + state.samples_in_epoch / (epoch_samples or float("inf")), scale)
            if problem:
                saved = save(t)
                t.tracker.finish()
                raise UserError(f"{problem} The run was checkpointed first: {saved}", echo=dist.is_main())

            # evaluate (keeping the best model), and stop early when it no longer improves
            if (
                t.eval_set is not None
                and run.eval.eval_every
                and step % run.eval.eval_every == 0
                and step < t.steps.total_steps
            ):
                run_eval(t)
                if should_stop_early(t):
                    break

            # checkpoint, and leave for a requeue when a rank was signalled
            if run.ckpt.save_every and step % run.ckpt.save_every == 0:
                save(t)
            if t.stop.agreed():
                preempt(t)
            if step >= t.steps.total_steps:
                break
        else:
            state.epoch += 1
            state.samples_in_epoch, state.epoch_batch = 0, t.split.global_batch


def finish(t: Training) -> dict:
    """Last evaluation and checkpoint; final/ gets the best (or last) model with its eval results."""
    state, out = t.state, t.run.out
    if t.eval_set is not None and not t.early_stopped and state.last_eval_step != state.step:
        run_eval(t)
    last = save(t)
    chosen = state.best_tag if t.keep_best and state.best_tag else last.name
    final_metrics = {}
    if dist.is_main():
        checkpoint.export(checkpoint.root(out) / chosen, out / "final")
        t.task.save_extra(out / "final")
        final_metrics = publish_eval_files(out / "evals" / chosen, out)
    shown = " ".join(f"{k}={v:.4g}" for k, v in final_metrics.items() if isinstance(v, (int, float)) and k != "step")
    t.tracker.summary(
        {
            **{f"final_{k}": v for k, v in final_metrics.items() if isinstance(v, (int, float))},
            "best_metric": state.best_metric,
            "steps": state.step,
            **t.speed.summary(),
        },
        final=f"final: {shown} ({chosen}, exported to final/)" if shown else f"final: {chosen}, exported to final/",
    )
    t.tracker.finish()
    dist.barrier()
    return final_metrics


# --- the loop's parts ------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(run: Run, task, record: dict) -> None:
    """Clear a previous run's files (--overwrite-output-dir) and write run_config.json. Only called
    after every input was validated, so a bad run never touches the dir."""
    out = run.out
    if dist.is_main():
        if run.ckpt.overwrite_output_dir:
            outputs = {name for cls in [*tasks.builtin(), type(task)] for name in cls.output_files}
            for name in (*RUN_FILES, *sorted(outputs)):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "run_config.json", record)
    dist.barrier()


def collate_batch(task, rows: list[dict]) -> dict:
    """A model batch from rows: the task's collate, and for an unpadded model where its real tokens are
    (computed here, on the CPU side, so the step itself needs no device sync to find them)."""
    batch = task.collate(rows)
    if task.packing is not None:
        from .unpad import add_packing

        add_packing(batch, **task.packing)
    return batch


def add_losses(sums: dict, loss, parts: dict) -> None:
    """Add a micro batch's loss (and its parts) to the sums of the log window, as tensors: reading
    them would wait for the GPU, so that happens only when a line is logged."""
    sums["count"] = sums.get("count", 0) + 1
    for k, v in {"loss": loss.detach(), **parts}.items():
        sums[k] = sums.get(k, 0.0) + v


def log_training(t: Training, epoch: float, scale) -> None:
    """One metrics row: mean losses of the window over all ranks, lr, throughput, memory, fp16 state,
    grad norm. Every rank calls it: the losses are averaged in one all-reduce per logged line."""
    engine, sums = t.engine, t.loss
    count = sums.pop("count")
    means = {k: v / count for k, v in zip(sums, dist.mean_over_ranks(list(sums.values()), engine.device))}
    row = {
        "epoch": epoch,
        "loss": means.pop("loss"),
        "lr": engine.get_lr()[0],
        "skipped_steps": engine.skipped_steps,
        **means,
        **t.speed.report(),
        **memory_stats(),
    }
    if scale is not None:
        row["loss_scale"] = float(scale)
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    t.tracker.log(t.state.step, row)
    t.loss = {}


def save(t: Training) -> Path:
    with t.speed.paused():  # throughput counts training time only
        return checkpoint.save(
            t.engine,
            t.run.out,
            asdict(t.state),
            t.tokenizer,
            t.run.ckpt.keep,
            protect=t.state.best_tag if t.keep_best else None,
        )


def run_eval(t: Training) -> dict:
    """Evaluate, keep the predictions of every evaluation in evals/step-N/, track the best model."""
    state = t.state
    eval_dir = t.run.out / "evals" / f"step-{state.step}"
    start = time.perf_counter()
    with t.speed.paused():
        metrics = evaluate(t.engine, t.task, t.eval_set, t.run.eval.eval_batch_size, eval_dir)
    seconds = time.perf_counter() - start  # forward, gather, post-processing, metric, predictions file
    if dist.is_main():
        write_json_atomic(eval_dir / "eval_results.json", {**metrics, "step": state.step})
    state.last_eval_step = state.step
    t.tracker.log(
        state.step,
        {
            "eval": 1,
            **{f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
            "eval_seconds": seconds,
            "eval_examples_per_s": t.task.eval_examples(t.eval_set) / seconds,
        },
    )
    value = metrics.get(t.best_metric)
    best = state.best_metric
    if value is not None and (
        best is None or (value > best if t.task.higher_is_better(t.best_metric) else value < best)
    ):
        state.best_metric, state.evals_without_improvement, state.best_tag = value, 0, f"step-{state.step}"
        if t.keep_best:
            save(t)
    else:
        state.evals_without_improvement += 1
    return metrics


def should_stop_early(t: Training) -> bool:
    patience = t.run.eval.early_stopping_patience
    if not patience or t.state.evals_without_improvement < patience:
        return False
    t.tracker.log(t.state.step, {"early_stopped": 1})
    if dist.is_main():
        print(
            f"[bertscale] early stopping: {patience} evaluations without improvement of {t.best_metric}",
            file=sys.stderr,
        )
    t.early_stopped = True
    return True


def preempt(t: Training) -> None:
    save(t)
    t.tracker.finish()
    if dist.is_main():
        print(
            f"[bertscale] checkpoint saved at step {t.state.step}; exiting with code {PreemptedExit.CODE} "
            "so the job can be requeued",
            file=sys.stderr,
            flush=True,
        )
    raise PreemptedExit()


def publish_eval_files(eval_dir: Path, out: Path) -> dict:
    """Copy the chosen model's eval results and predictions next to final/; returns its metrics."""
    if not eval_dir.is_dir():
        return {}
    for f in eval_dir.iterdir():
        copy_atomic(f, out / f.name)
    return json.loads((out / "eval_results.json").read_text())

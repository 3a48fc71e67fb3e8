"""Resume a checkpoint on another number of ranks or another ZeRO stage, through DeepSpeed's
universal checkpoints (deepspeed/checkpoint/ds_to_universal.py, then a load with load_universal).

A ZeRO checkpoint holds per-rank partitions in one stage's layout. `prepare` converts it once into
OUTPUT/checkpoints/step-N/universal/ (one folder per parameter: fp32 weights, Adam moments, step),
which any rank count and ZeRO stage can load; `load` loads it. The conversion is written under a
temporary name and renamed when complete, so a conversion killed midway leaves the checkpoint as
it was and the next resume converts again; the folder is pruned together with step-N.

DeepSpeed 0.19 converts ZeRO-1/2 and ZeRO-3 checkpoints, but each stage's loader reads only the
layout its own stage's converter writes. It neither converts nor loads ZeRO-0 (single_node in fp32):
`_convert_stage_0` and `_load_into_stage_0` do, in the same layout. `_make_stage_neutral`
rewrites the converted folder into one that both loaders read (file names, optimizer_state.pt,
per-parameter step, tensor shapes), and `load` undoes what the ZeRO-3 loader gets wrong (every
param group takes group 0's weight decay). Every torch.load in here, DeepSpeed's included, is weights-only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from .. import distributed as dist
from ..errors import UserError, first_line
from .load import _replay_cpu_adam_beta_powers
from .resume import SETUP_WORDS, changes
from .rng import restore_rng
from .safe_load import forced_weights_only
from .save import PARAM_NAMES, SETUP_KEYS, _fsync_tree, engine_setup, read_state

UNIVERSAL = "universal"
MARKER = "bertscale_universal.json"  # written last: a folder without it is not a finished conversion
FORMAT = 1  # bump when _make_stage_neutral changes: older conversions are then redone
# How ds_to_universal reports a layout it cannot convert (it asserts a lot).
UNCONVERTIBLE = (
    AssertionError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    OSError,
    NotImplementedError,
)
MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO-1/2, ZeRO-3


def universal_dir(ckpt) -> Path:
    return Path(ckpt) / UNIVERSAL


def is_universal(folder) -> bool:
    """A finished conversion (step-N/universal with its marker)."""
    return (Path(folder) / MARKER).is_file()


# --- conversion (rank 0) ---------------------------------------------------------------------


def prepare(ckpt) -> Path:
    """Every rank: rank 0 converts `ckpt` (or reuses its conversion) while the others wait;
    a refusal reaches every rank as the same UserError."""
    verdict = None
    if dist.is_main():
        try:
            verdict = ("ok", str(convert(ckpt)))
        except UserError as e:
            verdict = ("error", str(e))
    kind, value = dist.broadcast_object(verdict)
    if kind == "error":
        raise UserError(value, echo=dist.is_main())
    return Path(value)


def check_target(ckpt, state: dict, zero_stage: int, precision: str) -> None:
    """A universal checkpoint loads into ZeRO-1/2/3 engines (DeepSpeed) and into a stage-0 fp32 engine
    (`_load_into_stage_0`: the single_node preset in fp32). Stage 0 in fp16/bf16 wraps the optimizer in
    DeepSpeed's own 16-bit optimizers, which take none, whatever the checkpoint's own stage: refused
    here, before any work, with the setups that do resume it."""
    if zero_stage == 0 and precision != "fp32":
        own = f"ZeRO stage {state.get('zero_stage')} in {state.get('precision')}"
        raise UserError(
            f"{ckpt} ({own}, {state.get('world_size')} ranks) would need a universal checkpoint, which this "
            f"run's ZeRO stage 0 in {precision} cannot load (DeepSpeed's 16-bit stage-0 optimizers take none). "
            "Resume with --zero-stage 1 or higher, or with --fp32, or continue from its weights with a reset "
            f"optimizer: bertscale export --checkpoint {ckpt} --output W, then train with --model W in a new "
            "--output-dir"
        )


def convert(ckpt) -> Path:
    """step-N/universal/, converted now unless a complete conversion by this format and
    DeepSpeed version is already there. One process only (rank 0)."""
    import deepspeed

    ckpt = Path(ckpt)
    state = read_state(ckpt)
    out = universal_dir(ckpt)
    stamp = {
        "format": FORMAT,
        "deepspeed": deepspeed.__version__,
        "source": {k: state.get(k) for k in ("step", "world_size", "zero_stage", "precision")},
    }
    for leftover in ckpt.glob(".universal.tmp-*"):  # a conversion that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    if _marker(out) == stamp:
        return out
    _check_convertible(ckpt, state)
    print(
        f"[bertscale] converting {ckpt} to a universal checkpoint (once; kept next to it)", file=sys.stderr, flush=True
    )
    tmp = ckpt / f".universal.tmp-{socket.gethostname()}-{os.getpid()}"
    # DeepSpeed writes a `latest_universal` file next to its output folder: keep it inside tmp.
    work = tmp / UNIVERSAL
    tmp.mkdir()
    try:
        if int(state["zero_stage"]) == 0:
            _convert_stage_0(ckpt, work)
        else:
            _run_ds_to_universal(ckpt, work, state)
            _make_stage_neutral(work, int(state["zero_stage"]))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused or failed conversion leaves the checkpoint as it was
        raise
    (work / MARKER).write_text(json.dumps(stamp, indent=1) + "\n")
    _fsync_tree(work)
    if out.exists():  # a conversion by another format or DeepSpeed version: replace it
        trash = ckpt / f".universal.tmp-old-{os.getpid()}"
        os.rename(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(work, out)
    _fsync_tree(ckpt, files=False)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _check_convertible(ckpt: Path, state: dict) -> None:
    how = (
        f"resume with the setup it was written with ({SETUP_WORDS['world_size'](state['world_size'])}, "
        f"ZeRO stage {state['zero_stage']}), or continue from its weights with a reset optimizer: "
        f"bertscale export --checkpoint {ckpt} --output W, then train with --model W in a new --output-dir"
    )
    if int(state.get("zero_stage", 0)) < 1 and not (ckpt / PARAM_NAMES).is_file():
        raise UserError(
            f"{ckpt} was written without ZeRO partitioning (stage 0) and without {PARAM_NAMES} (by a stage-0 "
            "run in 16 bits, or an older bertscale), so it cannot be converted for another ZeRO stage or "
            f"precision; resume with ZeRO stage 0 and {state.get('precision')} (on any number of ranks), or "
            f"continue from its weights with a reset optimizer: bertscale export --checkpoint {ckpt} --output W, "
            "then train with --model W in a new --output-dir"
        )
    if (ckpt / "offloaded_tensors").exists():
        raise UserError(
            f"{ckpt} keeps its optimizer state in NVMe offload files, which DeepSpeed cannot convert "
            f"to a universal checkpoint; {how}"
        )
    with forced_weights_only(ckpt):
        model_files = sorted(ckpt.glob("*model_states.pt"))
        if not model_files:
            raise UserError(f"{ckpt}: no DeepSpeed model states found")
        frozen = torch.load(model_files[0], map_location="cpu").get("frozen_param_shapes") or {}
    if frozen:
        # DeepSpeed's universal loaders restore only parameters the optimizer steps.
        raise UserError(
            f"{ckpt} has frozen weights ({', '.join(list(frozen)[:3])}), which a universal checkpoint "
            f"does not restore; {how}"
        )


def _run_ds_to_universal(ckpt: Path, work: Path, state: dict) -> None:
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    # One worker: no child processes forked from a rank that holds a process group. HF models
    # carry no universal_checkpoint_info, which the ZeRO-1/2 path requires: inject_missing_state.
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(work),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # its prints and progress bars
    try:
        with forced_weights_only(ckpt), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except UNCONVERTIBLE as e:
        raise UserError(
            f"{ckpt}: DeepSpeed could not convert this checkpoint to a universal one "
            f"({first_line(e) if str(e).strip() else type(e).__name__}); the checkpoint "
            f"is unchanged. Resume it with {state.get('world_size')} ranks and ZeRO stage "
            f"{state.get('zero_stage')}, or start from its weights (bertscale export)"
        ) from None


def _convert_stage_0(ckpt: Path, work: Path) -> None:
    """DeepSpeed converts ZeRO-1/2/3 checkpoints only. A stage-0 fp32 one holds every state whole in
    one file (the module's weights by name, FusedAdam's moments by position, which optimizer_params.json
    names): written here in the layout that _make_stage_neutral gives DeepSpeed's conversions, through
    the same _write_shared_files."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    groups_names = json.loads((ckpt / PARAM_NAMES).read_text())
    with forced_weights_only(ckpt):
        model_state = torch.load(ckpt / MODEL_FILES[0], map_location="cpu")
    optim, module = model_state.pop("optimizer"), model_state["module"]
    (work / "zero").mkdir(parents=True)
    shapes, steps = [], set()
    for group, names in zip(optim["param_groups"], groups_names, strict=True):
        # FusedAdam advances the step of each group's last parameter only and steps the group with it
        states = [optim["state"].get(index, {}) for index in group["params"]]
        steps.add(max([int(s.get("step", 0)) for s in states] + [int(group.get("step", 0))]))
        for name, st in zip(names, states, strict=True):
            weight = module[name].float()
            folder = work / "zero" / name
            folder.mkdir()
            torch.save({PARAM: weight, CAT_DIM: 0}, folder / "fp32.pt")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({PARAM: st.get(key, torch.zeros_like(weight)), CAT_DIM: 0}, folder / f"{key}.pt")
        shapes.append({name: module[name].shape for name in names})
    model_state.update(optimizer=None, param_shapes=shapes, shared_params={})
    model_state.update(frozen_param_shapes={}, frozen_param_fragments={})
    _write_shared_files(work, model_state, optim, steps, [name for names in groups_names for name in names])


def _make_stage_neutral(work: Path, source_stage: int) -> None:
    """Make the converted folder loadable by the ZeRO-1/2 and the ZeRO-3 loader alike:
    - model states (LR scheduler, step counters) under both loaders' file names, without the
      weights (a universal load reads them from zero/): ZeRO-1/2 saves carry a full copy;
    - every parameter state as {"param": tensor in the parameter's shape} (ZeRO-3's converter
      writes flat tensors, which the ZeRO-1/2 loader cannot read), plus step.pt (ZeRO-3's omits it);
    - zero/optimizer_state.pt with the keys of both loaders, without ZeRO-3's copy of rank 0's partition."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    model_files = sorted(work.glob("*model_states.pt"))
    with forced_weights_only(work):
        model_state = torch.load(model_files[0], map_location="cpu")
        optim = torch.load(work / "zero" / "optimizer_state.pt", map_location="cpu")
        shapes = {name: torch.Size(shape) for group in model_state["param_shapes"] for name, shape in group.items()}
        steps = set()
        for name, shape in shapes.items():
            folder = work / "zero" / name
            if source_stage == 3:
                for key in ("fp32", "exp_avg", "exp_avg_sq"):
                    flat = torch.load(folder / f"{key}.pt", map_location="cpu")
                    torch.save({PARAM: flat.view(shape), CAT_DIM: 0}, folder / f"{key}.pt")
            else:
                steps.add(int(torch.load(folder / "step.pt")))
    if source_stage == 3:
        steps = {int(s["step"]) for s in optim["optimizer_state_dict"]["state"].values()}
    for f in model_files:
        f.unlink()
    _write_shared_files(work, model_state, optim, steps, shapes if source_stage == 3 else ())


def _write_shared_files(work: Path, model_state: dict, optim: dict, steps: set[int], need_step) -> None:
    """What both loaders read besides each parameter's tensors: step.pt for the parameters in
    `need_step` (the one step all groups stand at), zero/optimizer_state.pt with the keys of both
    loaders, and the model states without the weights under both loaders' file names."""
    if len(steps) != 1:
        raise UserError(
            f"{work.parent.parent}: the optimizer's parameter groups stand at different steps "
            f"({sorted(steps)}), which a universal checkpoint cannot carry"
        )
    step = steps.pop()
    for name in need_step:
        torch.save(step, work / "zero" / name / "step.pt")
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": [i]} for i, g in enumerate(optim["param_groups"])
    ]
    neutral = {
        k: optim[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad", "zero_stage") if k in optim
    }
    neutral.update(
        ds_version=optim.get("ds_version", model_state.get("ds_version")),
        param_groups=groups,
        optimizer_state_dict={"state": {0: {"step": step}}, "param_groups": groups},
    )
    torch.save(neutral, work / "zero" / "optimizer_state.pt")
    model_state["module"] = {}
    for name in MODEL_FILES:
        torch.save(model_state, work / name)


# --- loading (every rank) --------------------------------------------------------------------


def load(engine, ckpt, seed: int) -> tuple[dict, str]:
    """Load step-N/universal/ (made by `prepare`) into `engine`, whatever its rank count, ZeRO
    stage and precision. Returns the trainer state and what changed, in words, for the log line."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    now = engine_setup(engine)
    udir = universal_dir(ckpt)
    if not _appears(udir / MARKER, seconds=120):
        raise UserError(f"{ckpt}: no finished universal conversion in {udir} (call prepare() first)")
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    scaler = {
        k: getattr(engine.optimizer, k)
        for k in ("loss_scaler", "dynamic_loss_scale", "overflow")
        if hasattr(engine.optimizer, k)
    }
    if now["zero_stage"] == 0:
        _load_into_stage_0(engine, udir)
    else:
        engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
        try:
            with forced_weights_only(udir):
                path, _ = engine.load_checkpoint(
                    str(ckpt), tag=UNIVERSAL, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise UserError(f"{udir}: DeepSpeed could not load this universal checkpoint (files missing?)")
    # The ZeRO-3 loader gives every param group the hyperparameters of group 0 (weight decay on
    # biases and LayerNorms): keep this run's own; the LR comes from the restored schedule.
    for group, own in zip(opt.param_groups, hyper):
        group.update(own)
    if state.get("precision") != now["precision"]:
        for k, v in scaler.items():  # a loss scaler belongs to its precision (fp16 scales dynamically)
            setattr(engine.optimizer, k, v)
    _replay_cpu_adam_beta_powers(engine)
    rng = restore_rng(ckpt, state, seed)
    what = ", ".join(changes(state, now) or ["same setup"]) + (f"; {rng}" if rng else "")
    return {k: v for k, v in state.items() if k not in SETUP_KEYS}, what


def _load_into_stage_0(engine, udir: Path) -> None:
    """DeepSpeed loads universal checkpoints into ZeRO-1/2/3 engines only. A stage-0 fp32 engine (the
    single_node preset in fp32) steps the module's own weights with a plain FusedAdam, so each
    parameter's fp32 weights, Adam moments and step come from zero/<name>/ (the stock parameter names
    the module has too), and the schedule and counters from the model states."""
    from deepspeed.checkpoint.constants import PARAM

    opt, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    with forced_weights_only(udir), torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                folder = udir / "zero" / names[id(p)]
                if not folder.is_dir():
                    raise UserError(f"{udir}: no state for parameter {names[id(p)]}; is it a checkpoint of this model?")
                fp32, exp_avg, exp_avg_sq = (
                    torch.load(folder / f"{k}.pt", map_location=p.device)[PARAM].view_as(p)
                    for k in ("fp32", "exp_avg", "exp_avg_sq")
                )
                p.copy_(fp32)
                # FusedAdam steps a group with the step of its last parameter's state: every one gets it
                step = int(torch.load(folder / "step.pt"))
                opt.state[p] = {"step": step, "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
        model_state = torch.load(udir / MODEL_FILES[0], map_location="cpu")
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(model_state["lr_scheduler"])
    # DeepSpeed's schedulers restore the iteration only; the optimizer's groups need its LR for the next step
    scheduler.step(scheduler.last_batch_iteration)
    engine.global_steps = model_state["global_steps"]
    engine.global_samples = model_state["global_samples"]
    engine.skipped_steps = model_state["skipped_steps"]


def _appears(path: Path, seconds: float) -> bool:
    """Ranks on other nodes may see rank 0's new folder late (NFS caches directory lookups)."""
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


# --- export ----------------------------------------------------------------------------------


def state_dict(udir) -> dict:
    """fp32 weights of a universal folder, by parameter name (tied weights once, as in ZeRO saves)."""
    from deepspeed.checkpoint.constants import PARAM

    udir = Path(udir)
    if _marker(udir) is None:
        raise UserError(f"{udir}: not a finished universal conversion (no {MARKER})")
    out = {}
    with forced_weights_only(udir):
        for folder in sorted(p for p in (udir / "zero").iterdir() if p.is_dir()):
            out[folder.name] = torch.load(folder / "fp32.pt", map_location="cpu")[PARAM].float()
    return out

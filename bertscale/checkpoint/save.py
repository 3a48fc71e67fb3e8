"""Saving DeepSpeed checkpoints that survive crashes: atomic saves, pruning, and finding the newest.

Layout: OUTPUT/checkpoints/step-N/ holds DeepSpeed's files for tag step-N, plus
  trainer_state.json  step, epoch, data position in samples, best metric, model, task, world size, ZeRO
                      stage, precision, global batch
  universal/          (only after a resume on another setup) its conversion: see universal.py
  rng_rank{R}.pt      python/numpy/torch RNG states of rank R
  optimizer_params.json  (ZeRO stage 0 in fp32) the parameter names of each optimizer group, in the
                      optimizer's order: what converting it to a universal checkpoint needs
  hf/                 model config + tokenizer, so export needs nothing but this folder
A save is written as .tmp-step-N and renamed when every rank has finished, and only then is
`latest` updated; a crash mid-save leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..errors import UserError
from ..files import write_json_atomic, write_text_atomic

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir, state: dict, tokenizer, keep: int, protect: str | None = None) -> Path:
    """Save on all ranks; returns the final checkpoint dir. `protect` is never pruned (best)."""
    ckroot = root(output_dir)
    tag = f"step-{state['step']}"
    final = ckroot / tag
    full_state = {**state, **engine_setup(engine)}
    if dist.broadcast_object(final.exists()):  # rank 0's view: ranks on other nodes may see the FS late
        # Saved earlier at this step (e.g. eval save, then end-of-run save, or the checkpoint this run
        # resumed from): the weights are the same, only the trainer state (best metric) may have moved
        # on. The setup stays the one DeepSpeed's files were written with.
        if dist.is_main():
            written = {k: v for k, v in read_state(final).items() if k in SETUP_KEYS}
            write_json_atomic(final / STATE_FILE, {**full_state, **written})
        return final
    tmp_tag = f".tmp-{tag}"
    if dist.is_main():
        ckroot.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckroot / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckroot), tag=tmp_tag, save_latest=False)
    torch.save(rng_state(), ckroot / tmp_tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        hf = ckroot / tmp_tag / "hf"
        config = engine.module.config
        config.architectures = [stock_class_name(engine.module)]  # unset for randomly initialised models
        config.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        if full_state["zero_stage"] == 0 and full_state["precision"] == "fp32":
            write_json_atomic(ckroot / tmp_tag / PARAM_NAMES, optimizer_param_names(engine))
        write_json_atomic(ckroot / tmp_tag / STATE_FILE, full_state)
        _fsync_tree(ckroot / tmp_tag)
        os.rename(ckroot / tmp_tag, final)
        write_text_atomic(ckroot / "latest", tag + "\n")  # readers see the old or the new name, never half
        _fsync_tree(ckroot, files=False)
        prune(ckroot, keep, protect)
    dist.barrier()
    return final


SETUP_KEYS = ("world_size", "zero_stage", "precision", "global_batch")
PARAM_NAMES = "optimizer_params.json"


def optimizer_param_names(engine) -> list[list[str]]:
    """The names of each optimizer group's parameters, in its order. A stage-0 checkpoint keeps the
    optimizer's state by position only (torch's state_dict), which universal.py maps back to names."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def engine_setup(engine) -> dict:
    """How the engine's files are laid out (ranks, stage, precision) and its global batch (samples per step)."""
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {
        "world_size": dist.world_size(),
        "zero_stage": int(engine.zero_optimization_stage()),
        "precision": precision,
        "global_batch": int(engine.train_batch_size()),
    }


def _fsync_tree(path: Path, files: bool = True) -> None:
    """Flush file contents (and the directory entries) so a power loss cannot leave a renamed but empty save."""
    for p in [*path.rglob("*"), path] if files else [path]:
        if p.is_file() or p.is_dir():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def prune(ckroot: Path, keep: int, protect: str | None) -> None:
    """Keep the newest `keep` complete checkpoints (and `protect`); drop leftovers of interrupted saves."""
    for d in ckroot.glob(".deleting-*"):  # left by a crash mid-delete
        shutil.rmtree(d, ignore_errors=True)
    complete = sorted(_complete(ckroot), key=_step_of)
    doomed = [d for d in (complete[:-keep] if keep > 0 else []) if d.name != protect]
    doomed += [d for d in ckroot.glob(".tmp-step-*") if d.is_dir()]  # every rank has finished writing
    for d in doomed:
        # Renamed first, so a crash mid-delete never leaves a half step-N that looks complete.
        trash = d.with_name(f".deleting-{d.name.lstrip('.')}")
        os.rename(d, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _step_of(d: Path) -> int:
    return int(STEP_DIR.match(d.name).group(1))


def _complete(ckroot: Path) -> list[Path]:
    if not ckroot.is_dir():
        return []
    return [d for d in ckroot.iterdir() if STEP_DIR.match(d.name) and (d / STATE_FILE).is_file()]


def latest(output_dir) -> Path | None:
    """Newest complete checkpoint. A step dir only gets its name once complete, so the highest
    step wins even if a crash came between that rename and the update of `latest`."""
    complete = _complete(root(output_dir))
    return max(complete, key=_step_of) if complete else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}: not a complete bertscale checkpoint ({STATE_FILE}: {e})") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def stock_class_name(model) -> str:
    """The transformers class a checkpoint of `model` loads into: a training subclass of ours
    (tasks/pretraining_model.py) saves as its stock parent."""
    import transformers

    return next(c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c)

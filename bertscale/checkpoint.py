"""DeepSpeed checkpoints that survive crashes: atomic saves, pruning, resume, HF export.

Layout: OUTPUT/checkpoints/step-N/ holds DeepSpeed's files for tag step-N, plus
  trainer_state.json  step, epoch, data position, best metric, world size, model, task
  rng_rank{R}.pt      python/numpy/torch RNG states of rank R (loaded with weights_only=True)
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

from . import distributed as dist
from .config import write_json_atomic
from .errors import UserError

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def save(engine, output_dir, state: dict, tokenizer, keep: int, protect: str | None = None) -> Path:
    """Save on all ranks; returns the final checkpoint dir. `protect` is never pruned (best)."""
    ckroot = root(output_dir)
    tag = f"step-{state['step']}"
    final = ckroot / tag
    if final.exists():  # already saved at this step (e.g. eval save, then end-of-run save)
        return final
    tmp_tag = f".tmp-{tag}"
    if dist.is_main():
        ckroot.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckroot / tmp_tag, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckroot), tag=tmp_tag, save_latest=False)
    torch.save(_rng_state(), ckroot / tmp_tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        hf = ckroot / tmp_tag / "hf"
        config = engine.module.config
        config.architectures = [type(engine.module).__name__]  # unset for randomly initialised models
        config.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        write_json_atomic(ckroot / tmp_tag / STATE_FILE, {**state, "world_size": dist.world_size()})
        _fsync_dir(ckroot / tmp_tag)
        os.rename(ckroot / tmp_tag, final)
        (ckroot / ".latest.tmp").write_text(tag + "\n")
        os.replace(ckroot / ".latest.tmp", ckroot / "latest")
        _prune(ckroot, keep, protect)
    dist.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _prune(ckroot: Path, keep: int, protect: str | None) -> None:
    complete = sorted(_complete(ckroot), key=_step_of)
    for d in complete[:-keep] if keep > 0 else []:
        if d.name != protect:
            shutil.rmtree(d, ignore_errors=True)


def _step_of(d: Path) -> int:
    return int(STEP_DIR.match(d.name).group(1))


def _complete(ckroot: Path) -> list[Path]:
    if not ckroot.is_dir():
        return []
    return [d for d in ckroot.iterdir() if STEP_DIR.match(d.name) and (d / STATE_FILE).is_file()]


def latest(output_dir) -> Path | None:
    """Newest complete checkpoint: `latest` if it points at one, else the highest complete step."""
    ckroot = root(output_dir)
    pointer = ckroot / "latest"
    if pointer.is_file():
        cand = ckroot / pointer.read_text().strip()
        if (cand / STATE_FILE).is_file():
            return cand
    complete = _complete(ckroot)
    return max(complete, key=_step_of) if complete else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}: not a complete bertscale checkpoint ({STATE_FILE}: {e})") from None


def resolve_resume(run) -> Path | None:
    """The checkpoint to resume from for --resume auto|none|PATH."""
    if run.resume == "none":
        return None
    if run.resume == "auto":
        return latest(run.output_dir)
    path = Path(run.resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest(path.parent) if path.name == "checkpoints" else latest(path)
    if found is None:
        raise UserError(f"--resume {run.resume}: no complete checkpoint there "
                        f"(expected a step-N folder with {STATE_FILE})")
    return found


def load(engine, ckpt: Path) -> dict:
    """Restore engine, optimizer, scheduler, loss scaler and RNG state; returns trainer state."""
    state = read_state(ckpt)
    if state.get("world_size", dist.world_size()) != dist.world_size():
        raise UserError(
            f"{ckpt} was written by {state['world_size']} ranks and this run has {dist.world_size()}: "
            "ZeRO checkpoints hold per-rank partitions. Resume with the same number of ranks, or continue "
            f"from its weights (optimizer state reset): bertscale export --checkpoint {ckpt} --output W, "
            "then --model W --resume none")
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{ckpt}: DeepSpeed could not load this checkpoint (files missing?)")
    _set_rng_state(torch.load(ckpt / f"rng_rank{dist.rank()}.pt", weights_only=True))
    return state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()),
                                                    *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def consolidated_state_dict(ckpt: Path) -> dict:
    """fp32 weights gathered from all ZeRO partitions (or the plain module for stage 0)."""
    ckpt = Path(ckpt)
    if any(ckpt.glob("*optim_states.pt")) and any(ckpt.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    module_file = ckpt / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{ckpt}: no DeepSpeed model states found")
    states = torch.load(module_file, map_location="cpu", weights_only=False)  # DeepSpeed pickles its config
    return {k: v.float() for k, v in states["module"].items()}


def export(ckpt, output) -> Path:
    """Write a Hugging Face model dir (fp32 weights, config, tokenizer) from any checkpoint."""
    from transformers import AutoConfig, AutoTokenizer
    import transformers

    ckpt, output = Path(ckpt), Path(output)
    if (ckpt / "checkpoints").is_dir():
        ckpt = latest(ckpt) or ckpt
    if not (ckpt / "hf").is_dir():
        raise UserError(f"--checkpoint {ckpt}: not a bertscale checkpoint (no hf/ folder); "
                        "pass OUTPUT_DIR/checkpoints/step-N or an output dir")
    config = AutoConfig.from_pretrained(ckpt / "hf")
    model_cls = getattr(transformers, config.architectures[0])
    state = consolidated_state_dict(ckpt)
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    # Tied MLM decoder weights are stored once, under the word embeddings.
    untied = {k for k in missing if not ("decoder" in k or k.endswith("predictions.bias"))}
    if unexpected or untied:
        raise UserError(f"{ckpt}: weights do not match {config.architectures[0]} "
                        f"(missing {sorted(untied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ckpt / "hf").save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    os.rename(tmp, output)
    return output

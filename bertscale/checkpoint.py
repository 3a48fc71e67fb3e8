"""DeepSpeed checkpoints that survive crashes: atomic saves, pruning, resume, HF export.

Layout: OUTPUT/checkpoints/step-N/ holds DeepSpeed's files for tag step-N, plus
  trainer_state.json  step, epoch, data position, best metric, model, task, world size, ZeRO stage, precision
  rng_rank{R}.pt      python/numpy/torch RNG states of rank R
  hf/                 model config + tokenizer, so export needs nothing but this folder
A save is written as .tmp-step-N and renamed when every rank has finished, and only then is
`latest` updated; a crash mid-save leaves the previous checkpoint as the newest complete one.
Every torch.load here is weights_only=True (DeepSpeed's own loads included, see _weights_only_loads).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
import zipfile
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


# --- saving ----------------------------------------------------------------------------------

def save(engine, output_dir, state: dict, tokenizer, keep: int, protect: str | None = None) -> Path:
    """Save on all ranks; returns the final checkpoint dir. `protect` is never pruned (best)."""
    ckroot = root(output_dir)
    tag = f"step-{state['step']}"
    final = ckroot / tag
    full_state = {**state, **engine_setup(engine)}
    if dist.broadcast_object(final.exists()):  # rank 0's view: ranks on other nodes may see the FS late
        # Saved earlier at this step by this run (e.g. eval save, then end-of-run save): the weights
        # are the same, only the trainer state (best metric) may have moved on.
        if dist.is_main():
            write_json_atomic(final / STATE_FILE, full_state)
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
        config.architectures = [_stock_class_name(engine.module)]  # unset for randomly initialised models
        config.save_pretrained(hf)
        tokenizer.save_pretrained(hf)
        write_json_atomic(ckroot / tmp_tag / STATE_FILE, full_state)
        _fsync_tree(ckroot / tmp_tag)
        os.rename(ckroot / tmp_tag, final)
        (ckroot / ".latest.tmp").write_text(tag + "\n")
        os.replace(ckroot / ".latest.tmp", ckroot / "latest")  # readers see the old or the new name, never half
        _fsync_tree(ckroot, files=False)
        _prune(ckroot, keep, protect)
    dist.barrier()
    return final


def engine_setup(engine) -> dict:
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"world_size": dist.world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": precision}


def _fsync_tree(path: Path, files: bool = True) -> None:
    """Flush file contents (and the directory entries) so a power loss cannot leave a renamed but empty save."""
    for p in [*path.rglob("*"), path] if files else [path]:
        if p.is_file() or p.is_dir():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _prune(ckroot: Path, keep: int, protect: str | None) -> None:
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


# --- resuming --------------------------------------------------------------------------------

def plan_resume(run, task_name: str) -> Path | None:
    """The checkpoint this run continues from, after checking that it may: call it before anything
    is built or written. Rank 0 decides (one view of the file system), every rank gets the answer."""
    verdict = None
    if dist.is_main():
        try:
            verdict = ("resume", _plan_resume(run, task_name, dist.world_size()))
        except UserError as e:
            verdict = ("error", str(e))
    kind, value = dist.broadcast_object(verdict)
    if kind == "error":
        raise UserError(value, echo=dist.is_main())
    return value


def _plan_resume(run, task_name: str, world_size: int) -> Path | None:
    out = Path(run.output_dir)
    explicit = run.resume not in ("auto", "none")
    if run.overwrite_output_dir:
        if explicit and _inside(Path(run.resume), out):
            raise UserError(f"--resume {run.resume} lies in {out}, which --overwrite-output-dir clears first; "
                            "resume without --overwrite-output-dir, or into another --output-dir")
        ckpt = _explicit_checkpoint(run.resume) if explicit else None  # starting over: auto finds nothing
    else:
        newest = latest(out)
        ckpt = _explicit_checkpoint(run.resume) if explicit else newest if run.resume == "auto" else None
        if newest is not None and (ckpt is None or ckpt.resolve() != newest.resolve()):
            # Another timeline's steps would be mixed with the checkpoints already there.
            why = "--resume none starts a new run" if ckpt is None else f"--resume {run.resume} is not its newest"
            raise UserError(f"{out} holds checkpoints up to {newest.name} and {why}: continue with --resume "
                            "auto, or use another --output-dir (--resume PATH works from there), or "
                            "--overwrite-output-dir to start over")
    if ckpt is None:
        return None
    state = read_state(ckpt)
    for key, now in (("model", run.model), ("task", task_name)):
        if key in state and state[key] != now:
            where = (f"{out} holds checkpoints of another run" if _inside(ckpt, out)
                     else f"--resume {run.resume} is a checkpoint of another run")
            raise UserError(f"{where} ({key} {state[key]!r}, this run {now!r}); use another --output-dir, or "
                            "--overwrite-output-dir to start over")
    check_same_setup(ckpt, state, {"world_size": world_size})
    return ckpt


def _explicit_checkpoint(path_arg: str) -> Path:
    """--resume PATH: a step-N dir, OUTPUT/checkpoints, or an output dir (its newest checkpoint)."""
    path = Path(path_arg)
    if (path / STATE_FILE).is_file():
        return path
    found = latest(path.parent) if path.name == "checkpoints" else latest(path)
    if found is None:
        raise UserError(f"--resume {path_arg}: no complete checkpoint there "
                        f"(expected a step-N folder with {STATE_FILE})")
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


SETUP_WORDS = {"world_size": lambda v: f"{v} rank{'s' * (v != 1)}", "zero_stage": lambda v: f"ZeRO stage {v}",
               "precision": str}


def check_same_setup(ckpt: Path, state: dict, now: dict) -> None:
    """ZeRO checkpoints hold per-rank partitions in one stage's layout and precision: refuse a
    resume that DeepSpeed would fail on with a traceback, or would load inexactly."""
    for key, words in SETUP_WORDS.items():
        if key in now and key in state and state[key] != now[key]:
            raise UserError(
                f"{ckpt} was written with {words(state[key])} and this run has {words(now[key])}: a resume needs "
                "the same number of ranks, ZeRO stage and precision. Or continue from its weights (optimizer "
                f"state reset): bertscale export --checkpoint {ckpt} --output W, then train with --model W in a "
                "new --output-dir")


def load(engine, ckpt: Path) -> dict:
    """Restore engine, optimizer, scheduler, loss scaler and RNG state; returns trainer state."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    check_same_setup(ckpt, state, engine_setup(engine))
    with _weights_only_loads(engine):
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise UserError(f"{ckpt}: DeepSpeed could not load this checkpoint (files missing?)")
    _replay_cpu_adam_beta_powers(engine)
    _set_rng_state(safe_load(ckpt / f"rng_rank{dist.rank()}.pt"))
    return {k: v for k, v in state.items() if k not in SETUP_WORDS}


def _replay_cpu_adam_beta_powers(engine) -> None:
    """DeepSpeed's CPU Adam kernels (FusedAdam on the CPU accelerator, DeepSpeedCPUAdam for ZeRO-Offload)
    keep beta**t in float32 by multiplying once per step, while a fresh process starts from pow(beta, t).
    The two differ in the last bit at some t (0.999**3 does), so a resumed run would drift ~1e-7 from
    an unbroken one. Stepping the kernel through 1..t on a 1-element scratch tensor rebuilds the same
    product. (CUDA kernels compute beta**t from t at every step: nothing to do there.)"""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the base optimizer
    steps = [int(s["step"]) for s in opt.state.values() if "step" in s]
    if not steps:
        return
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    param, grad, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    if isinstance(opt, DeepSpeedCPUAdam):
        def kernel_step(t):
            opt.ds_opt_adam.adam_update(opt.opt_id, t, 0.0, beta1, beta2, group["eps"], 0.0,
                                        group["bias_correction"], param, grad, exp_avg, exp_avg_sq)
    elif isinstance(opt, FusedAdam) and get_accelerator().device_name() == "cpu":
        def kernel_step(t):
            opt.multi_tensor_adam(1, opt._dummy_overflow_buf, [[grad], [param], [exp_avg], [exp_avg_sq]], 0.0,
                                  beta1, beta2, group["eps"], t, int(opt.adam_w_mode),
                                  int(group["bias_correction"]), 0.0)
    else:
        return
    for t in range(1, max(steps) + 1):
        kernel_step(t)


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


# --- weights-only loading --------------------------------------------------------------------

def _deepspeed_pickled_classes() -> list:
    """The only non-tensor objects DeepSpeed 0.19 pickles into ZeRO-2/3 checkpoints (fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, **kwargs):
    """torch.load(weights_only=True), allowing DeepSpeed's few checkpoint classes."""
    try:
        with torch.serialization.safe_globals(_deepspeed_pickled_classes()):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UserError(f"{path}: holds a pickled Python object that bertscale does not load "
                        f"({found.group(1) if found else str(e).splitlines()[0]}); only tensors and DeepSpeed's "
                        "known checkpoint classes are unpickled, so arbitrary code cannot run") from None


class _WeightsOnlyLoads:
    """DeepSpeed's TorchCheckpointEngine with weights-only loads (0.19 hard-codes weights_only=False)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location)


@contextlib.contextmanager
def _weights_only_loads(engine):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    original = engine.checkpoint_engine
    if type(original) is TorchCheckpointEngine:  # other engines (fast writer, Nebula) read their own way
        engine.checkpoint_engine = _WeightsOnlyLoads(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


# --- export ----------------------------------------------------------------------------------

def consolidated_state_dict(ckpt: Path) -> dict:
    """fp32 weights gathered from all ZeRO partitions (or the plain module for stage 0)."""
    ckpt = Path(ckpt)
    if any(ckpt.glob("*optim_states.pt")) and any(ckpt.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's consolidation unpickles with weights_only=False: open every file safely first
        # (memory-mapped, so cheap), so a checkpoint with foreign objects is refused before that.
        for f in ckpt.glob("*.pt"):
            safe_load(f, map_location="cpu", mmap=zipfile.is_zipfile(f))
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    module_file = ckpt / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{ckpt}: no DeepSpeed model states found")
    return {k: v.float() for k, v in safe_load(module_file, map_location="cpu")["module"].items()}


def _stock_class_name(model) -> str:
    """The transformers class a checkpoint of `model` loads into: a training subclass of ours
    (tasks/pretraining_model.py) saves as its stock parent."""
    import transformers

    return next(c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c)


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
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes 0600; teammates on a shared cluster must read it
        os.chmod(f, 0o666 & ~umask)
    os.rename(tmp, output)
    return output

"""Loading a checkpoint into a built engine: model, optimizer, scheduler, loss scaler and RNG state,
exactly as they were (see _replay_cpu_adam_beta_powers). A ZeRO stage 0 checkpoint holds every state
whole, so it loads on any number of ranks this way too; other changes of setup go through universal.py."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .resume import changes, check_same_setup
from .rng import restore_rng
from .safe_load import weights_only_loads
from .save import SETUP_KEYS, engine_setup, read_state


def load(engine, ckpt: Path, seed: int) -> tuple[dict, str]:
    """Restore engine, optimizer, scheduler, loss scaler and RNG state. Returns the trainer state and
    what changed, in words ("" when nothing did), for the log line."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    now = engine_setup(engine)
    check_same_setup(ckpt, state, now)
    with weights_only_loads(engine):
        path, _ = engine.load_checkpoint(
            str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if path is None:
        raise UserError(f"{ckpt}: DeepSpeed could not load this checkpoint (files missing?)")
    _replay_cpu_adam_beta_powers(engine)
    rng = restore_rng(ckpt, state, seed)  # the rank count may differ (stage 0)
    what = ", ".join(changes(state, now)) + (f"; {rng}" if rng else "")
    return {k: v for k, v in state.items() if k not in SETUP_KEYS}, what


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
            opt.ds_opt_adam.adam_update(
                opt.opt_id,
                t,
                0.0,
                beta1,
                beta2,
                group["eps"],
                0.0,
                group["bias_correction"],
                param,
                grad,
                exp_avg,
                exp_avg_sq,
            )
    elif isinstance(opt, FusedAdam) and get_accelerator().device_name() == "cpu":

        def kernel_step(t):
            opt.multi_tensor_adam(
                1,
                opt._dummy_overflow_buf,
                [[grad], [param], [exp_avg], [exp_avg_sq]],
                0.0,
                beta1,
                beta2,
                group["eps"],
                t,
                int(opt.adam_w_mode),
                int(group["bias_correction"]),
                0.0,
            )
    else:
        return
    for t in range(1, max(steps) + 1):
        kernel_step(t)

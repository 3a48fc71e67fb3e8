"""Weights-only unpickling for every checkpoint file bertscale reads, DeepSpeed's own loads included:
only tensors and DeepSpeed's few known checkpoint classes are unpickled, so a checkpoint from
elsewhere cannot run code."""

from __future__ import annotations

import contextlib
import os
import pickle
import re

import torch

from ..errors import UserError, first_line


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
        raise _foreign_pickle(path, e) from None


def _foreign_pickle(where, e: pickle.UnpicklingError) -> UserError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    return UserError(
        f"{where}: holds a pickled Python object that bertscale does not load "
        f"({found.group(1) if found else first_line(e)}); only tensors and DeepSpeed's "
        "known checkpoint classes are unpickled, so arbitrary code cannot run"
    )


class _WeightsOnlyLoads:
    """DeepSpeed's TorchCheckpointEngine with weights-only loads (0.19 hard-codes weights_only=False)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path, map_location=None):
        return safe_load(path, map_location=map_location)


@contextlib.contextmanager
def weights_only_loads(engine):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    original = engine.checkpoint_engine
    if type(original) is TorchCheckpointEngine:  # other engines (fast writer, Nebula) read their own way
        engine.checkpoint_engine = _WeightsOnlyLoads(original)
    try:
        yield
    finally:
        engine.checkpoint_engine = original


@contextlib.contextmanager
def forced_weights_only(where):
    """Every torch.load in the block is weights-only, DeepSpeed's own included: its universal converter
    and loaders call torch.load with weights_only=False, which TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides
    per call. DeepSpeed's few checkpoint classes are allowed."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_pickled_classes()):
            yield
    except pickle.UnpicklingError as e:
        raise _foreign_pickle(where, e) from None
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before

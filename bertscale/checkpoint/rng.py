"""RNG streams across a resume: each rank's python/numpy/torch state back as it was saved, or, on
another number of ranks, the kept ranks' streams back and new ranks seeded from (seed, step, rank)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from .safe_load import safe_load


def restore_rng(ckpt: Path, state: dict, seed: int) -> str | None:
    """Ranks that existed when the checkpoint was written get their RNG streams back; new ranks
    are seeded from (seed, step, rank); the streams of ranks that are gone are dropped. Returns
    what that changes, in words, or None when every stream carries over."""
    old, new, rank = int(state.get("world_size", 1)), dist.world_size(), dist.rank()
    saved = ckpt / f"rng_rank{rank}.pt"
    kept = rank < old and saved.is_file()
    if kept:
        set_rng_state(safe_load(saved))
    else:
        seed_rank(seed, int(state["step"]), rank)
    lost = dist.any_rank(rank < old and not kept)  # a save always writes every rank's file
    if old == new and not lost:
        return None
    what = ([f"RNG {_ranks(new, old, 'state')} dropped"] if old > new else []) + (
        [f"{_ranks(old, new)} seeded from the run's seed and step"] if new > old else []
    )
    if lost:
        what.append("ranks without their saved RNG state seeded from the run's seed and step")
    return " and ".join(what) + ", so dropout masks differ from an uninterrupted run"


def _ranks(first: int, stop: int, of: str = "") -> str:
    one = stop - first == 1
    ranks = f"rank {first}" if one else f"ranks {first}-{stop - 1}"
    return f"{of}{'' if one else 's'} of {ranks}" if of else ranks


def seed_rank(seed: int, step: int, rank: int) -> None:
    derived = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

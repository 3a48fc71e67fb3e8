"""The input pipeline: batches read, collated (padding, masking, packing for unpadded models) and pinned
in DataLoader worker processes, prefetched while the step before runs.

Which rows make batch i is data.py's decision; what a batch holds is a pure function of the seed,
the epoch, the rank and i (collate's randomness, MLM masking, is seeded per batch), so a resumed
run rebuilds exactly the batches it would have seen, in whatever process they are built.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable

import torch

from . import data


def default_workers(world_size_here: int) -> int:
    """Worker processes per rank: the cores this rank does not need for its own step, at most 4. On a
    CPU-only box where every core already runs a rank this is 0 (batches are built in the rank itself)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // max(world_size_here, 1) - 1))


def batch_seed(seed: int, epoch: int, rank: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{rank}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class Batches(torch.utils.data.Dataset):
    """Item i: the collated batch of the i-th row-id list, built with torch's RNG seeded for that batch."""

    def __init__(self, features, batches: list[list[int]], collate: Callable, seed: int, epoch: int, rank: int,
                 finish: Callable | None = None):
        self.features, self.batches, self.collate, self.finish = features, batches, collate, finish
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        rows = data.rows_of(self.features, self.batches[i])
        with torch.random.fork_rng(devices=[]):  # the training process's own RNG stream is left alone
            torch.manual_seed(batch_seed(self.seed, self.epoch, self.rank, i))
            batch = self.collate(rows)
        return self.finish(batch) if self.finish else batch


def iterate(source: Batches, start: int, workers: int, pin_memory: bool):
    """(i, batch) for i = start, start + 1, ...: built `workers` processes ahead of the caller (in the
    calling process when workers is 0), pinned for non-blocking copies to the GPU."""
    indices = range(start, len(source))
    if workers == 0:
        for i in indices:
            batch = source[i]
            yield i, _pinned(batch) if pin_memory else batch
        return
    loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=indices, num_workers=workers,
                                         pin_memory=pin_memory, prefetch_factor=2, persistent_workers=False,
                                         multiprocessing_context="fork")
    yield from zip(indices, loader)


def _pinned(batch: dict) -> dict:
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

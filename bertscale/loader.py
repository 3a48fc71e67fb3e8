"""The input pipeline: batches read, collated (padding, masking, packing for unpadded models) and
pinned in DataLoader worker processes, prefetched while the step before runs.

Which rows make a batch is data.py's decision; what a batch holds is a pure function of the seed,
the epoch and where the batch starts in the epoch's order (collate's randomness, MLM masking, is
seeded per batch), so a resumed run rebuilds exactly the batches it would have seen, whichever
process builds them and however the global batch is split into ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from . import data, distributed


def default_workers(local_ranks: int, device_type: str) -> int:
    """Worker processes per rank: the cores the ranks of this node leave free, at most 4 each. A rank
    that computes on the CPU keeps its torch threads' cores (distributed.share_cpu_cores gives them all
    by default), so it gets workers only from cores beyond those: a worker sharing a core with the
    compute threads stalls every step more than building the batch in the rank costs (tiny model on
    2 cores, benchmarks/step_overhead.py: 45-81 ms a step with a worker, 30-42 ms without)."""
    cores = distributed.usable_cores()
    busy = local_ranks * (torch.get_num_threads() if device_type == "cpu" else 1)
    return max(0, min(4, (cores - busy) // max(local_ranks, 1)))


def batch_seed(seed: int, epoch: int, position: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def build(rows: list[dict], collate: Callable, seed: int) -> dict:
    """A collated batch, its randomness drawn from `seed` (the caller's own RNG stream is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return collate(rows)


class Batches(torch.utils.data.Dataset):
    """Item i: the collated batch of micro batch i, a (position in the epoch's order, row ids) pair."""

    def __init__(self, features, micro_batches: list, collate: Callable, seed: int, epoch: int):
        self.features, self.micro_batches, self.collate = features, micro_batches, collate
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict:
        position, ids = self.micro_batches[i]
        return build(data.rows_of(self.features, ids), self.collate, batch_seed(self.seed, self.epoch, position))


def train_epoch(
    features,
    lengths,
    split,
    seed: int,
    epoch: int,
    position,
    group_by_length: bool,
    collate: Callable,
    workers: int = 0,
    pin_memory: bool = False,
):
    """(batch, samples in the epoch or None) for this rank's micro batches still to train in the epoch;
    `lengths` None means `features` is a stream, read here by every rank in step (it cannot be split
    across worker processes and resumed)."""
    if lengths is None:
        skip = position[0] // split.world  # rows of this rank's shard already trained
        stream = data.stream_batches(features, split.micro, split.world, split.rank, seed, epoch, skip)
        for i, rows in enumerate(stream):
            yield _pinned(build(rows, collate, batch_seed(seed, epoch, skip + i)), pin_memory), None
        return
    micro, epoch_samples = data.epoch_micro_batches(lengths, split, seed, epoch, position, group_by_length)
    source = Batches(features, micro, collate, seed, epoch)
    if workers == 0:
        batches = (_pinned(source[i], pin_memory) for i in range(len(source)))
    else:
        batches = torch.utils.data.DataLoader(
            source, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory, prefetch_factor=2
        )
    for batch in batches:
        yield batch, epoch_samples


def _pinned(batch: dict, pin: bool) -> dict:
    if not pin:
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

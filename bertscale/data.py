"""Which rows go into which batch on which rank: length-grouped, deterministic, resumable.

Batches are a pure function of (seed, epoch, lengths, sizes), so a resumed run rebuilds the same
order and skips the batches it already did; no sampler state needs saving.
"""
from __future__ import annotations

import itertools

import numpy as np

from . import distributed as dist

GROUP_CHUNK = 64  # global batches per sort chunk: long enough to group lengths, short enough to stay random


def train_batches(lengths, micro: int, world: int, rank: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """This rank's micro batches for one epoch.

    Every rank computes the same global order (same seed), so ranks see equal-length batches in
    step. With grouping, each global batch holds similar lengths (less padding); the order of the
    global batches is shuffled so lengths still vary over time. The incomplete tail is dropped.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    glob = micro * world
    n_batches = len(order) // glob
    order = order[: n_batches * glob]
    if group_by_length and n_batches:
        lens = np.asarray(lengths)[order]
        chunk = glob * GROUP_CHUNK
        for start in range(0, len(order), chunk):
            part = slice(start, start + chunk)
            order[part] = order[part][np.argsort(-lens[part], kind="stable")]
        batches = order.reshape(n_batches, glob)
        batches = batches[rng.permutation(n_batches)]
    else:
        batches = order.reshape(n_batches, glob)
    return [b[rank * micro:(rank + 1) * micro].tolist() for b in batches]


def eval_batches(lengths, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's eval batches: sorted by length (little padding), dealt round-robin.

    Every rank gets the same number of batches (an empty list marks a filler) because under
    ZeRO-3 each forward pass is a collective that all ranks must join.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    per_rank = -(-len(batches) // world)
    return mine + [[] for _ in range(per_rank - len(mine))]


def is_streaming(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def stream_batches(dataset, micro: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
    """(index, rows) micro batches of this rank's shard of a streamed dataset.

    A stream's shards can differ in length, so the ranks agree to stop as soon as any of them
    runs dry (a rank that stopped alone would leave the others waiting in a collective).
    Resuming skips `start` batches by reading past them: a stream cannot seek.
    """
    from datasets.distributed import split_dataset_by_node

    shuffled = dataset.shuffle(seed=seed, buffer_size=10_000)
    shuffled.set_epoch(epoch)
    rows = iter(split_dataset_by_node(shuffled, rank=rank, world_size=world))
    for i in itertools.count():
        batch = list(itertools.islice(rows, micro))
        if dist.any_rank(len(batch) < micro):
            return
        if i >= start:
            yield i, batch

"""Which rows go into which batch on which rank: length-grouped, deterministic, resumable.

Batches are a pure function of (seed, epoch, lengths, sizes), so a resumed run rebuilds the same
order and skips the batches it already did; no sampler state needs saving.
"""
from __future__ import annotations

import numpy as np

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

"""Which rows go into which batch on which rank: length-grouped, deterministic, resumable.

Batches are a pure function of (seed, epoch, lengths, sizes), so a resumed run rebuilds the same
order and skips the batches it already did; no sampler state needs saving. Also: how many steps
a run takes (plan_steps), which is where a data set smaller than one batch is refused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import distributed as dist
from .errors import UserError

GROUP_CHUNK = 64  # global batches per sort chunk: long enough to group lengths, short enough to stay random


def train_batches(
    lengths, micro: int, world: int, rank: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
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
    return [b[rank * micro : (rank + 1) * micro].tolist() for b in batches]


def eval_batches(lengths, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's eval batches: sorted by length (little padding), dealt round-robin.

    Every rank gets the same number of batches (an empty list marks a filler) because under
    ZeRO-3 each forward pass is a collective that all ranks must join.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
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


@dataclass
class StepPlan:
    steps_per_epoch: int | None  # None for a stream, which has no length
    total_steps: int


def plan_steps(rows: int | None, optim, world: int, description: str = "") -> StepPlan:
    """Steps per epoch and in all, from the number of training rows (None: a stream) and the batch
    flags (`optim`: micro batch, accumulation, epochs, max steps). A data set that does not fill
    one optimizer step is refused here, naming what was read (`description`)."""
    if rows is None:
        if optim.max_steps <= 0:
            raise UserError("--streaming: a stream has no length, so --epochs cannot be counted; pass --max-steps")
        return StepPlan(None, optim.max_steps)
    per_step = optim.micro_batch_size * optim.grad_accum * world
    if rows < per_step:
        accum = f" x --grad-accum {optim.grad_accum}" if optim.grad_accum > 1 else ""
        raise UserError(
            f"{description or f'{rows} training rows'}, fewer than one batch (--micro-batch-size "
            f"{optim.micro_batch_size}{accum} x {world} processes = {per_step}). Add training data, "
            "or lower --micro-batch-size."
        )
    steps_per_epoch = rows // (optim.micro_batch_size * world) // optim.grad_accum
    total = optim.max_steps if optim.max_steps > 0 else math.ceil(optim.epochs * steps_per_epoch)
    return StepPlan(steps_per_epoch, total)


def epoch_batches(
    features,
    lengths,
    micro: int,
    world: int,
    rank: int,
    seed: int,
    epoch: int,
    start: int,
    group_by_length: bool = True,
):
    """(batch index, rows, batches in the epoch or None) of this rank, from batch `start` on;
    `lengths` None means `features` is a stream."""
    if lengths is None:
        for i, rows in stream_batches(features, micro, world, rank, seed, epoch, start):
            yield i, rows, None
        return
    batches = train_batches(lengths, micro, world, rank, seed, epoch, group_by_length)
    for i in range(start, len(batches)):
        yield i, rows_of(features, batches[i]), len(batches)


def rows_of(dataset, ids) -> list[dict]:
    cols = dataset[ids]  # one columnar read is much faster than len(ids) row reads
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]

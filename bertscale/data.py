"""Which rows go into which batch on which rank: length-grouped, deterministic, resumable.

An epoch's order is a pure function of (seed, epoch, lengths, global batch), built in units of the
global batch G = micro x accumulation x ranks: micro batch j of a global batch (j = slot x ranks +
rank) goes to `rank` at accumulation step `slot`. So one rank with twice the accumulation trains on
the same micro batches as two ranks, and the data position is a count of samples, not of batches:
- resumed with the same G (any split into micro x accumulation x ranks): from sample
  `samples_in_epoch` on, exactly the batches the uninterrupted run would have seen;
- resumed with another G: the rest of the epoch's order (built with the G the epoch started with),
  cut into batches of the new G; the tail that does not fill one is dropped, as always. The next
  epochs use the new G.
No sampler state needs saving. Also: how many steps a run takes (plan_steps), which is where a data
set smaller than one batch is refused, and the accumulation a --global-batch-size asks for.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import distributed as dist
from .errors import UserError

GROUP_CHUNK = 64  # global batches per sort chunk: long enough to group lengths, short enough to stay random


@dataclass(frozen=True)
class Split:
    """How a global batch is cut: micro batch, accumulation steps, ranks, and which rank this is."""

    micro: int
    accum: int
    world: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def epoch_order(lengths, global_batch: int, seed: int, epoch: int, group_by_length: bool = True) -> np.ndarray:
    """All rows of one epoch that fill whole global batches, in training order (flat).

    Every rank computes the same order (same seed). With grouping, each global batch holds similar
    lengths (less padding), and the global batches are shuffled so lengths still vary over time.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    n_batches = len(order) // global_batch
    order = order[: n_batches * global_batch]
    if group_by_length and n_batches:
        lens = np.asarray(lengths)[order]
        chunk = global_batch * GROUP_CHUNK
        for start in range(0, len(order), chunk):
            part = slice(start, start + chunk)
            order[part] = order[part][np.argsort(-lens[part], kind="stable")]
        order = order.reshape(n_batches, global_batch)[rng.permutation(n_batches)].reshape(-1)
    return order


def global_batches(order: np.ndarray, samples_in_epoch: int, global_batch: int) -> list[np.ndarray]:
    """The global batches still to train in an epoch, from sample `samples_in_epoch` of its order on."""
    rest = order[samples_in_epoch:]
    return [rest[i * global_batch : (i + 1) * global_batch] for i in range(len(rest) // global_batch)]


def micro_batch(batch: np.ndarray, split: Split, slot: int) -> list[int]:
    """The rows of a global batch that `split.rank` trains at accumulation step `slot`."""
    j = slot * split.world + split.rank
    return batch[j * split.micro : (j + 1) * split.micro].tolist()


def train_batches(
    lengths, micro: int, world: int, rank: int, seed: int, epoch: int, group_by_length: bool = True, accum: int = 1
) -> list[list[int]]:
    """This rank's micro batches for one whole epoch, in training order (`accum` per optimizer step)."""
    split = Split(micro, accum, world, rank)
    order = epoch_order(lengths, split.global_batch, seed, epoch, group_by_length)
    return [micro_batch(b, split, slot) for b in global_batches(order, 0, split.global_batch) for slot in range(accum)]


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


def stream_batches(dataset, micro: int, world: int, rank: int, seed: int, epoch: int, skip_rows: int = 0):
    """Micro batches of this rank's shard of a streamed dataset, after its first `skip_rows` rows.

    A stream's shards can differ in length, so the ranks agree to stop as soon as any of them
    runs dry (a rank that stopped alone would leave the others waiting in a collective).
    Resuming reads past the rows already trained: a stream cannot seek.
    """
    from datasets.distributed import split_dataset_by_node

    shuffled = dataset.shuffle(seed=seed, buffer_size=10_000)
    shuffled.set_epoch(epoch)
    rows = iter(split_dataset_by_node(shuffled, rank=rank, world_size=world))
    next(itertools.islice(rows, skip_rows, skip_rows), None)
    while True:
        batch = list(itertools.islice(rows, micro))
        if dist.any_rank(len(batch) < micro):
            return
        yield batch


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
    steps_per_epoch = rows // per_step
    total = optim.max_steps if optim.max_steps > 0 else math.ceil(optim.epochs * steps_per_epoch)
    return StepPlan(steps_per_epoch, total)


def epoch_micro_batches(lengths, split: Split, seed: int, epoch: int, position, group_by_length: bool = True):
    """(micro batches, samples in the epoch): this rank's micro batches still to train in the epoch,
    from `position` = (samples_in_epoch, the global batch the epoch's order was built with) on, each as
    (where its first row sits in the epoch's order, row ids). That place names the batch (loader.py
    seeds its masking with it): the same for any split of the same global batch into ranks."""
    samples_in_epoch, epoch_batch = position
    order = epoch_order(lengths, epoch_batch, seed, epoch, group_by_length)
    micro = []
    for k, batch in enumerate(global_batches(order, samples_in_epoch, split.global_batch)):
        start = samples_in_epoch + k * split.global_batch
        for slot in range(split.accum):
            j = slot * split.world + split.rank
            micro.append((start + j * split.micro, micro_batch(batch, split, slot)))
    return micro, len(order)


def rows_of(dataset, ids) -> list[dict]:
    cols = dataset[ids]  # one columnar read is much faster than len(ids) row reads
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def with_global_batch(optim, world: int):
    """`optim` with the accumulation that --global-batch-size asks for on `world` ranks (N / (micro x
    ranks)), so a job requeued on fewer nodes keeps its global batch; refused when it does not divide."""
    if optim.global_batch_size is None:
        return optim
    per_accum = optim.micro_batch_size * world
    accum, rest = divmod(optim.global_batch_size, per_accum)
    if rest or not accum:
        raise UserError(
            f"--global-batch-size {optim.global_batch_size} is not a multiple of --micro-batch-size "
            f"{optim.micro_batch_size} x {world} rank{'s' * (world != 1)} = {per_accum}: pass a multiple of "
            f"{per_accum}, or another --micro-batch-size"
        )
    if optim.grad_accum not in (1, accum):
        raise UserError(
            f"--global-batch-size {optim.global_batch_size} sets the accumulation ({optim.global_batch_size} / "
            f"({optim.micro_batch_size} x {world}) = {accum}) but --grad-accum is {optim.grad_accum}: "
            "pass only one of them"
        )
    return dataclasses.replace(optim, grad_accum=accum)

"""data.py: which rows go into which batch on which rank, deterministically, at any data position in
samples and any split of the global batch; how many steps a run takes; --global-batch-size."""

import numpy as np
import pytest

from bertscale import data
from bertscale.args import OptimArgs
from bertscale.errors import UserError

LENGTHS = list(np.random.default_rng(0).integers(8, 384, size=1000))


def all_ranks(world, **kw):
    return [
        data.train_batches(
            LENGTHS, 8, world, rank, seed=3, epoch=kw.get("epoch", 0), group_by_length=kw.get("group", True)
        )
        for rank in range(world)
    ]


def test_batches_are_a_pure_function_of_seed_and_epoch():
    assert all_ranks(2) == all_ranks(2)
    assert all_ranks(2) != all_ranks(2, epoch=1)
    assert data.train_batches(LENGTHS, 8, 2, 0, seed=4, epoch=0) != all_ranks(2)[0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_each_global_batch_and_drop_the_incomplete_tail(world):
    ranks = all_ranks(world)
    n_batches = len(LENGTHS) // (8 * world)
    assert all(len(batches) == n_batches for batches in ranks)
    rows = [i for batches in ranks for b in batches for i in b]
    assert len(rows) == len(set(rows)) == n_batches * 8 * world  # each row at most once per epoch
    assert all(len(b) == 8 for batches in ranks for b in batches)


def test_length_grouping_puts_similar_lengths_together():
    def spread(batches):
        return np.mean([np.ptp([LENGTHS[i] for i in b]) for b in batches])

    grouped, plain = all_ranks(1)[0], all_ranks(1, group=False)[0]
    assert spread(grouped) < spread(plain) / 3
    assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # same rows, new order


def resumed_rows(split, position, epoch=0) -> list[list[int]]:
    """The row ids of this rank's micro batches from `position` on."""
    return [ids for _, ids in data.epoch_micro_batches(LENGTHS, split, 3, epoch, position)[0]]


def test_resume_starts_at_the_sample_it_stopped_at():
    split = data.Split(micro=8, accum=1, world=2, rank=1)
    full, samples = data.epoch_micro_batches(LENGTHS, split, seed=3, epoch=0, position=(0, 16))
    resumed, _ = data.epoch_micro_batches(LENGTHS, split, seed=3, epoch=0, position=(5 * 16, 16))
    assert resumed == full[5:]  # the same rows, named by the same places in the epoch's order
    assert samples == len(LENGTHS) // 16 * 16  # samples in the epoch's order
    assert [p for p, _ in full[:3]] == [8, 24, 40]  # rank 1's micro batch starts 8 rows into each global batch


def old_train_batches(lengths, micro, world, rank, seed, epoch, group_by_length=True):
    """data.train_batches before positions were counted in samples (order in units of micro x ranks)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    glob = micro * world
    n_batches = len(order) // glob
    order = order[: n_batches * glob]
    if group_by_length and n_batches:
        lens = np.asarray(lengths)[order]
        for start in range(0, len(order), glob * data.GROUP_CHUNK):
            part = slice(start, start + glob * data.GROUP_CHUNK)
            order[part] = order[part][np.argsort(-lens[part], kind="stable")]
        batches = order.reshape(n_batches, glob)[rng.permutation(n_batches)]
    else:
        batches = order.reshape(n_batches, glob)
    return [b[rank * micro : (rank + 1) * micro].tolist() for b in batches]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("micro,world", [(4, 1), (2, 2), (3, 4)])
def test_with_accumulation_1_the_order_is_the_one_before_samples(micro, world, group):
    for rank in range(world):
        assert data.train_batches(LENGTHS, micro, world, rank, 3, 2, group) == old_train_batches(
            LENGTHS, micro, world, rank, 3, 2, group
        )


def test_a_checkpoint_from_before_samples_resumes_exactly_with_accumulation():
    """Such a checkpoint holds batch_in_epoch (micro batches per rank, in units of micro x ranks):
    TrainState.position_from_batches turns it into samples of an order in those units, from which
    the same micro batches follow, accumulation 2 included."""
    from bertscale.trainer import TrainState

    old = old_train_batches(LENGTHS, 4, 2, 1, 3, 0)  # what the run trained, 2 micro batches per step
    state = TrainState()
    state.position_from_batches({"batch_in_epoch": 10}, micro=4, world=2)
    assert (state.samples_in_epoch, state.epoch_batch) == (80, 8)
    split = data.Split(micro=4, accum=2, world=2, rank=1)
    rest = old[10 : 10 + (len(old) - 10) // 2 * 2]  # whole steps of 2 micro batches
    assert resumed_rows(split, (80, 8)) == rest


def test_same_global_batch_same_micro_batches_whatever_the_split():
    """Micro 2 on 4 ranks, on 2 ranks x accumulation 2, on 1 rank x accumulation 4: each step trains the
    same 4 micro batches, from the start and from any resume position that is a multiple of 8."""

    def steps(world, accum, start):
        splits = [data.Split(2, accum, world, r) for r in range(world)]
        per_rank = [resumed_rows(split, (start, 8)) for split in splits]
        return [
            sorted(tuple(r[k]) for r in per_rank for k in range(s, s + accum))
            for s in range(0, len(per_rank[0]), accum)
        ]

    assert steps(4, 1, 0) == steps(2, 2, 0) == steps(1, 4, 0)
    assert steps(1, 4, 40) == steps(4, 1, 0)[5:]


def test_another_global_batch_continues_the_epoch_without_repeats_or_gaps():
    order = data.epoch_order(LENGTHS, 8, 3, 0)
    before = np.concatenate(data.global_batches(order, 0, 8)[:7])  # 7 steps of 8, then resumed with 12
    after = np.concatenate(data.global_batches(order, 56, 12))
    seen = np.concatenate([before, after]).tolist()
    assert len(set(seen)) == len(seen) and seen == order[: len(seen)].tolist()
    assert len(order) - len(seen) < 12  # only the tail that fills no batch is left


def test_a_resumed_stream_reads_past_the_rows_already_trained():
    import datasets

    stream = datasets.Dataset.from_dict({"x": list(range(40))}).to_iterable_dataset(num_shards=2)
    full = list(data.stream_batches(stream, 4, 1, 0, seed=3, epoch=1))
    assert len(full) == 10
    assert list(data.stream_batches(stream, 4, 1, 0, seed=3, epoch=1, skip_rows=12)) == full[3:]
    assert list(data.stream_batches(stream, 2, 1, 0, seed=3, epoch=1, skip_rows=12))[:2] == [
        full[3][:2],
        full[3][2:],
    ]  # another micro batch: the same rows


def test_global_batch_size_sets_the_accumulation():
    assert data.with_global_batch(OptimArgs(micro_batch_size=4, global_batch_size=32), 2).grad_accum == 4
    assert data.with_global_batch(OptimArgs(micro_batch_size=4, global_batch_size=32), 8).grad_accum == 1
    assert data.with_global_batch(OptimArgs(grad_accum=3), 2).grad_accum == 3  # no --global-batch-size
    with pytest.raises(
        UserError,
        match=r"--global-batch-size 24 is not a multiple of --micro-batch-size 4 x "
        r"4 ranks = 16: pass a multiple of 16",
    ):
        data.with_global_batch(OptimArgs(micro_batch_size=4, global_batch_size=24), 4)
    with pytest.raises(UserError, match=r"sets the accumulation \(32 / \(4 x 2\) = 4\) but --grad-accum is 2"):
        data.with_global_batch(OptimArgs(micro_batch_size=4, global_batch_size=32, grad_accum=2), 2)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_batches_equal_in_count_with_fillers(world):
    lengths = LENGTHS[:101]
    per_rank = [data.eval_batches(lengths, 16, world, rank) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # ZeRO-3: every rank joins every forward pass
    rows = [i for batches in per_rank for b in batches for i in b]
    assert sorted(rows) == list(range(101))
    fillers = sum(b == [] for batches in per_rank for b in batches)
    assert fillers == len(per_rank[0]) * world - -(-101 // 16)
    for batches in per_rank:
        firsts = [lengths[b[0]] for b in batches if b]
        assert firsts == sorted(firsts, reverse=True)  # longest first: little padding


def test_plan_steps():
    optim = OptimArgs(micro_batch_size=4, grad_accum=2, epochs=1.5)
    assert data.plan_steps(100, optim, 2) == data.StepPlan(6, 9)  # 100 // 8 // 2 = 6 per epoch
    assert data.plan_steps(100, OptimArgs(micro_batch_size=4, max_steps=7), 2).total_steps == 7
    with pytest.raises(
        UserError,
        match=r"x: 15 rows, fewer than one batch \(--micro-batch-size 4 x --grad-accum 2 "
        r"x 2 processes = 16\)",
    ):
        data.plan_steps(15, optim, 2, "x: 15 rows")
    with pytest.raises(UserError, match="a stream has no length.*--max-steps"):
        data.plan_steps(None, optim, 2)
    assert data.plan_steps(None, OptimArgs(max_steps=50), 2) == data.StepPlan(None, 50)

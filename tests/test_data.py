"""data.py: which rows go into which batch on which rank, deterministically, and how many steps a run takes."""

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


def test_resume_starts_at_the_batch_it_stopped_at():
    feats = {"input_ids": [[i] * 3 for i in range(len(LENGTHS))]}

    class Rows(dict):
        def __getitem__(self, ids):  # a datasets.Dataset's columnar read
            return {"input_ids": [feats["input_ids"][i] for i in ids]}

    full = list(data.epoch_batches(Rows(), LENGTHS, 8, 2, 1, seed=3, epoch=0, start=0))
    resumed = list(data.epoch_batches(Rows(), LENGTHS, 8, 2, 1, seed=3, epoch=0, start=5))
    assert [i for i, _, _ in resumed] == list(range(5, len(full)))
    assert [rows for _, rows, _ in resumed] == [rows for _, rows, _ in full[5:]]
    assert {n for _, _, n in full} == {len(LENGTHS) // 16}


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

"""loader.py: batches built in worker processes equal those built in the rank, and what a batch holds
(MLM masks included) depends only on the seed, the epoch and where it sits in the epoch's order."""

import pytest
import torch

from bertscale import data, loader, tasks
from bertscale.models import load_tokenizer

from conftest import DATA


@pytest.fixture(scope="module")
def pretraining():
    """The pretraining task (random masks in collate) on a WikiText slice, and its training pairs."""
    run = tasks.make_run(
        "pretrain",
        model="tiny",
        train_files=(str(DATA / "corpus" / "wikitext-2-raw" / "wiki.test.raw"),),
        document_separator="heading",
        validation_split_percentage=0,
        max_seq_length=64,
        max_train_samples=256,
    )
    task = tasks.build(run, load_tokenizer("tiny"))
    features = task.train_features()
    return task, features, task.lengths(features)


def epoch(pretraining, split, position=(0, 16), workers=0):
    task, features, lengths = pretraining
    return [b for b, _ in loader.train_epoch(features, lengths, split, 5, 0, position, True, task.collate, workers)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


def test_worker_processes_build_the_same_batches(pretraining):
    split = data.Split(micro=8, accum=1, world=2, rank=0)
    torch.manual_seed(0)
    here = epoch(pretraining, split)
    torch.manual_seed(1)  # the rank's own RNG does not decide the masks
    assert same(epoch(pretraining, split, workers=2), here)
    assert sum(int((b["labels"] != -100).sum()) for b in here) > 0  # masked for real


def test_a_resumed_epoch_rebuilds_the_same_batches(pretraining):
    split = data.Split(micro=8, accum=1, world=2, rank=1)
    full = epoch(pretraining, split)
    assert same(epoch(pretraining, split, position=(3 * 16, 16)), full[3:])


def test_one_rank_with_twice_the_accumulation_gets_the_two_ranks_batches(pretraining):
    two = [epoch(pretraining, data.Split(8, 1, 2, rank)) for rank in range(2)]
    one = epoch(pretraining, data.Split(8, 2, 1, 0))
    assert same(one[0::2], two[0]) and same(one[1::2], two[1])  # the same rows and the same masks


def test_the_same_rows_get_new_masks_each_epoch_and_the_same_ones_on_a_rebuild(pretraining):
    task, features, _ = pretraining
    rows = data.rows_of(features, list(range(8)))
    first = loader.build(rows, task.collate, loader.batch_seed(5, 0, 0))
    assert torch.equal(loader.build(rows, task.collate, loader.batch_seed(5, 0, 0))["labels"], first["labels"])
    assert not torch.equal(loader.build(rows, task.collate, loader.batch_seed(5, 1, 0))["labels"], first["labels"])


def test_default_workers_leave_the_compute_threads_their_cores(monkeypatch):
    """On CPU a worker gets only a core the ranks' torch threads do not use; on a GPU node each rank
    keeps one core for itself and the rest (at most 4 each) build batches."""
    monkeypatch.setattr(loader.distributed, "usable_cores", lambda: 16)
    monkeypatch.setattr(loader.torch, "get_num_threads", lambda: 8)
    assert loader.default_workers(2, "cpu") == 0  # 2 ranks x 8 threads = all 16 cores
    assert loader.default_workers(1, "cpu") == 4  # 8 cores free, at most 4 workers
    monkeypatch.setattr(loader.torch, "get_num_threads", lambda: 6)
    assert loader.default_workers(2, "cpu") == 2  # 4 cores free, 2 per rank
    assert loader.default_workers(8, "cuda") == 1  # 16 cores, 8 ranks each keep one
    assert loader.default_workers(2, "cuda") == 4

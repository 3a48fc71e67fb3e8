"""The task registry: names, GLUE's pattern, a user's task by file or import path, and which task a
trained model belongs to."""

import pytest
from transformers import BertConfig

from bertscale import tasks
from bertscale.errors import UserError
from bertscale.tasks.classify import ClassifyTask
from bertscale.tasks.pretraining import PretrainingTask
from bertscale.tasks.squad import SquadTask, SquadV2Task

from conftest import ROOT

EXAMPLE = ROOT / "examples" / "pair_regression.py"


def test_built_in_names_resolve_to_their_classes():
    assert {n: tasks.resolve(n) for n in ("squad", "squad_v2", "classify", "glue:rte", "pretrain")} == {
        "squad": SquadTask,
        "squad_v2": SquadV2Task,
        "classify": ClassifyTask,
        "glue:rte": ClassifyTask,
        "pretrain": PretrainingTask,
    }
    assert tasks.default_name() == "squad"
    with pytest.raises(
        UserError, match="--task squadd: unknown task; choose one of classify, glue:<name>, pretrain, squad, squad_v2"
    ):
        tasks.resolve("squadd")


def test_a_users_task_by_file_or_module_path(monkeypatch):
    by_file = tasks.resolve(f"{EXAMPLE}:PairRegression")
    assert by_file.__name__ == "PairRegression" and tasks.is_user_spec(f"{EXAMPLE}:PairRegression")
    assert tasks.resolve(f"{EXAMPLE}:PairRegression") is by_file  # imported once
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    assert tasks.resolve("pair_regression:PairRegression").__name__ == "PairRegression"
    monkeypatch.chdir(ROOT)
    assert tasks.canonical("examples/pair_regression.py:PairRegression") == f"{EXAMPLE}:PairRegression"
    assert tasks.canonical("glue:sst2") == "glue:sst2" and not tasks.is_user_spec("glue:sst2")


def test_a_trained_model_names_its_task():
    assert tasks.name_for_model(BertConfig(bertscale_task="squad_v2")) == "squad_v2"
    assert tasks.name_for_model(BertConfig(architectures=["BertForQuestionAnswering"])) == "squad"
    assert tasks.name_for_model(BertConfig(architectures=["BertForSequenceClassification"])) == "classify"
    assert tasks.name_for_model(BertConfig(architectures=["BertForMaskedLM"])) is None


def test_runs_are_built_from_flat_flags():
    run = tasks.make_run("squad", doc_stride=64, learning_rate=1e-4, max_train_samples=5)
    assert (run.task, run.task_args.doc_stride, run.optim.learning_rate, run.data.max_train_samples) == (
        "squad",
        64,
        1e-4,
        5,
    )
    assert run.flags()["doc_stride"] == 64 and run.flags()["task"] == "squad"
    with pytest.raises(UserError, match=r"--max-train-samples 0: must be 1 or more \(leave it out to use all\)"):
        tasks.make_run("classify", max_train_samples=0)
    with pytest.raises(TypeError, match="doc_stride"):
        tasks.make_run("classify", doc_stride=64)  # not a classification setting


def test_prepare_is_offered_by_the_tasks_that_implement_it(tmp_path):
    from bertscale.models import load_tokenizer

    assert tasks.preparing() == [PretrainingTask]  # `bertscale prepare` runs it without --task
    squad = tasks.build(tasks.make_run("squad", model="tiny"), load_tokenizer("tiny"))
    with pytest.raises(UserError, match="--task squad has nothing to prepare: it reads its data when it trains"):
        squad.prepare(tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()

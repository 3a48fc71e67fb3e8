"""SQuAD files -> examples: the hub's columns, v2 no-answer questions, and one clear message for
each kind of bad input. Also the task's data entry points (sample limits, no eval file)."""

import copy
import gzip
import json

import datasets
import huggingface_hub.constants
import pytest

from bertscale import tasks
from bertscale.args import DataArgs
from bertscale.errors import UserError
from bertscale.models import load_tokenizer
from bertscale.tasks.squad import SquadTask, SquadV2Task
from bertscale.tasks.squad_data import DEMO_DIR, load_examples, load_squad_file

CONTEXT = "The cat sat on the mat. The dog slept."
DOC = {
    "version": "1.1",
    "data": [
        {
            "title": "Pets",
            "paragraphs": [
                {
                    "context": CONTEXT,
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where did the cat sit?",
                            "answers": [{"text": "the mat", "answer_start": 15}],
                        },
                        {
                            "id": "q2",
                            "question": "Who slept?",
                            "answers": [{"text": "The dog", "answer_start": 24}, {"text": "dog", "answer_start": 28}],
                        },
                    ],
                }
            ],
        }
    ],
}


def _write(tmp_path, doc, name="squad.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _load(path, version_2=False, training=True):
    return load_squad_file(path, version_2=version_2, training=training)


def test_demo_files_have_the_hub_columns():
    train = _load(DEMO_DIR / "train.json")
    dev = _load(DEMO_DIR / "dev.json", training=False)
    assert train.column_names == ["id", "title", "context", "question", "answers"]
    assert (len(train), len(dev)) == (2009, 403)
    row = train[0]
    text, start = row["answers"]["text"][0], row["answers"]["answer_start"][0]
    assert row["context"][start : start + len(text)] == text
    assert len(dev[0]["answers"]["text"]) == 3  # dev keeps every reference answer
    assert (DEMO_DIR / "LICENSE.txt").read_text().count("CC BY-SA 4.0") == 1


def test_gzip_file_loads_like_the_plain_one(tmp_path):
    path = tmp_path / "squad.json.gz"
    path.write_bytes(gzip.compress(json.dumps(DOC).encode()))
    assert _load(path)[:] == _load(_write(tmp_path, DOC))[:]


def test_v2_impossible_questions_have_no_reference(tmp_path):
    examples = _load("/work/shared/data/squad/dev-v2.0-first5.json", version_2=True, training=False)
    raw = json.loads(open("/work/shared/data/squad/dev-v2.0-first5.json").read())
    impossible = {qa["id"] for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"] if qa["is_impossible"]}
    empty = {row["id"] for row in examples if not row["answers"]["text"]}
    assert empty == impossible and len(impossible) == 702  # plausible_answers are not references
    with pytest.raises(UserError, match="use --task squad_v2"):
        _load("/work/shared/data/squad/dev-v2.0-first5.json", version_2=False, training=False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"data": [{"title": "x", "paragraphs": [}', "malformed JSON at line 1, column 41"),
        ('{"data": [\n  {"title": "x",\n   "paragraphs": [1, 2,]}]}', "malformed JSON at line 3, column 24"),
        ("[1, 2]", "not SQuAD format"),
    ],
)
def test_malformed_json_names_file_line_and_column(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=expected) as err:
        _load(path)
    assert str(path) in str(err.value)


def _broken(mutate):
    doc = copy.deepcopy(DOC)
    mutate(doc["data"][0]["paragraphs"][0])
    return doc


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda p: p["qas"][1].pop("answers"),
            r"question id 'q2' \(data\[0\].paragraphs\[0\].qas\[1\]\) has no 'answers'",
        ),
        (lambda p: p["qas"][0].pop("question"), r"question id 'q1' .* has no 'question'"),
        (lambda p: p["qas"][1].pop("id"), r"data\[0\].paragraphs\[0\].qas\[1\] has no 'id'"),
        (lambda p: p.pop("context"), r"data\[0\].paragraphs\[0\] has no 'context'"),
        (lambda p: p["qas"][0].update(answers=[]), r"question id 'q1' .* empty 'answers' list"),
        (
            lambda p: p["qas"][0]["answers"][0].update(answer_start="15"),
            r"'answer_start' should be an integer, not str",
        ),
        (lambda p: p["qas"][0]["answers"][0].update(answer_start=99), r"answer_start 99 is outside the context"),
        (lambda p: p["qas"][1].update(id="q1"), r"question id 'q1' .* ids must be unique"),
    ],
)
def test_bad_records_are_named(tmp_path, mutate, expected):
    path = _write(tmp_path, _broken(mutate))
    with pytest.raises(UserError, match=expected) as err:
        _load(path)
    assert str(path) in str(err.value)


def test_answer_start_mismatch_is_skipped_and_counted(tmp_path):
    # q1's only answer is off by one: skipped; q2 keeps its good second answer.
    doc = _broken(
        lambda p: (p["qas"][0]["answers"][0].update(answer_start=14), p["qas"][1]["answers"][0].update(answer_start=23))
    )
    with pytest.warns(UserWarning, match="2 answers have an answer_start .* 1 questions were skipped"):
        examples = _load(_write(tmp_path, doc))
    assert examples["id"][:] == ["q2"]
    assert examples[0]["answers"] == {"text": ["dog"], "answer_start": [28]}
    # Evaluation only reads the answer texts, so an eval file keeps them all.
    assert len(_load(_write(tmp_path, doc), training=False)) == 2


def test_no_usable_training_question_is_an_error(tmp_path):
    doc = _broken(lambda p: [a.update(answer_start=0) for qa in p["qas"] for a in qa["answers"]])
    with (
        pytest.raises(UserError, match=r"no usable training question in the file \(2 skipped"),
        pytest.warns(UserWarning),
    ):
        _load(_write(tmp_path, doc))


def test_missing_file_and_unreachable_hub(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="--train-file .*nope.json: no such file"):
        load_examples(DataArgs(train_file=str(tmp_path / "nope.json")), "train", False)
    # Offline, the hub fails at once instead of retrying; the message points at local files.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="--dataset squad_v2: cannot load split 'train'.*--train-file"):
        load_examples(DataArgs(), "train", True)


def test_task_data_entry_points(tmp_path):
    assert tasks.resolve("squad") is SquadTask and tasks.resolve("squad_v2") is SquadV2Task and SquadV2Task.version_2
    tokenizer = load_tokenizer("tiny")
    run = tasks.make_run(
        "squad", train_file=str(DEMO_DIR / "train.json"), max_train_samples=7, max_seq_length=128, doc_stride=32
    )
    task = tasks.build(run, tokenizer)
    assert task.label_names() == ("start_positions", "end_positions") and task.main_metric == "f1"
    features = task.train_features()
    assert features.column_names == [
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "start_positions",
        "end_positions",
    ]
    assert len(features) >= 7 and max(task.lengths(features)) <= 128
    assert task.eval_set() is None  # a train file without an eval file: no evaluation

    run = tasks.make_run(
        "squad", train_file=str(DEMO_DIR / "train.json"), eval_file=str(DEMO_DIR / "dev.json"), max_eval_samples=5
    )
    eval_set = tasks.build(run, tokenizer).eval_set()
    assert eval_set.examples["id"][:] == _load(DEMO_DIR / "dev.json", training=False)["id"][:5]
    assert set(eval_set.features["example_id"][:]) == set(eval_set.examples["id"][:])

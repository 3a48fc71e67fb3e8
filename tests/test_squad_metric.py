"""Official SQuAD v1.1 / v2.0 metrics on hand-worked cases, n-best post-processing on constructed
logits, and the task's evaluation end to end (oracle logits, a real tiny model, `answer`)."""

import json

import numpy as np
import pytest
import torch

from bertscale import tasks
from bertscale.models import build_model, load_tokenizer
from bertscale.tasks.squad import SquadTask, SquadV2Task, answer, offset_rows
from bertscale.tasks.squad_data import DEMO_DIR
from bertscale.tasks.squad_metric import compute_f1, f1_score_v1, normalize_answer, squad_v1, squad_v2
from bertscale.tasks.squad_postprocess import postprocess, window_candidates

# --- metrics -------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a day") == "apple day"
    assert normalize_answer("Theory of the anthem") == "theory of anthem"  # articles only as whole words
    assert normalize_answer("U.S.-based") == "usbased"


def test_v1_hand_worked():
    references = {"q1": ["Eiffel Tower", "tower"], "q2": ["Paris", "France!"], "q3": ["1990"]}
    predictions = {"q1": "the Eiffel tower.", "q2": "in Paris France"}  # q3 unanswered: scores 0
    # q2: 'in paris france' vs 'paris': P 1/3, R 1 -> F1 0.5 (same against 'france'); EM 0.
    assert squad_v1(predictions, references) == pytest.approx({"exact_match": 100 / 3, "f1": 50.0})
    # Repeated tokens count as often as they appear in both: P = R = 2/3.
    assert f1_score_v1("red red blue", "red blue blue") == pytest.approx(2 / 3)


def test_v1_and_v2_differ_on_empty_answers():
    assert f1_score_v1("", "the") == 0  # v1: no common tokens, 0
    assert compute_f1("the", "") == 1  # v2: both normalise to no-answer, they agree


def test_v2_hand_worked():
    references = {"q1": ["Denver Broncos"], "q2": [], "q3": ["1990"], "q4": [], "q5": ["Santa Clara"]}
    predictions = {"q1": "Denver Broncos", "q2": "", "q3": "in 1990", "q4": "Paris", "q5": "Santa Clara"}
    na_probs = {"q1": -3.0, "q2": 2.0, "q3": 0.5, "q4": -2.0, "q5": 1.5}
    out = squad_v2(predictions, references, na_probs)
    # Raw exact: 1 1 0 0 1; raw F1: 1 1 2/3 0 1 ('in 1990' vs '1990': P 1/2, R 1). With
    # --na-prob-thresh 1.0, q2 and q5 count as no-answer predictions: q2 stays right, q5 becomes wrong.
    assert out == pytest.approx(
        {
            "exact": 40.0,
            "f1": 100 * (2 + 2 / 3) / 5,
            "total": 5,
            "HasAns_exact": 100 / 3,
            "HasAns_f1": 100 * (1 + 2 / 3) / 3,
            "HasAns_total": 3,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
            # Threshold search over na_probs in rising order q1 q4 q3 q5 q2, starting from 2 (all no-answer)
            # and adding each question's score, or -1 for a no-answer question given an answer (q4):
            # exact 2 -> 3 (best, at -3.0) -> 2 -> 2 -> 3 -> 3;
            # F1 2 -> 3 -> 2 -> 2.667 -> 3.667 (best, at 1.5) -> 3.667.
            "best_exact": 60.0,
            "best_exact_thresh": -3.0,
            "best_f1": 100 * (3 + 2 / 3) / 5,
            "best_f1_thresh": 1.5,
        }
    )
    # A lower threshold turns q3's answer into a no-answer prediction too.
    out = squad_v2(predictions, references, na_probs, na_prob_thresh=0.0)
    assert (out["exact"], out["f1"]) == (40.0, 40.0)


def test_v2_without_na_probs_and_gold_that_normalises_to_nothing():
    references = {"q1": ["The"], "q2": ["Paris"]}
    out = squad_v2({"q1": "", "q2": "paris"}, references)
    # 'The' normalises to '', so only an empty prediction is right; q1 still counts as HasAns.
    assert out == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 2,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 2,
    }


# --- post-processing -----------------------------------------------------------------------------

CONTEXT = "Alpha beta gamma delta epsilon zeta eta theta"
WORDS = CONTEXT.split()


def _window(n_question=3):
    """Offsets of one window: [CLS] + question tokens + [SEP], then one token per context word, [SEP]."""
    offsets, pos = [[-1, -1]] * (n_question + 2), 0
    for w in WORDS:
        offsets = offsets + [[pos, pos + len(w)]]
        pos += len(w) + 1
    return np.array(offsets + [[-1, -1]])


def _logits(n, peaks):
    x = np.zeros(n, dtype=np.float32)
    for i, v in peaks.items():
        x[i] = v
    return x


def _one(start, end, offsets, **kw):
    return postprocess(["q"], [CONTEXT], ["q"], [offsets], [start], [end], **kw)["q"]


def test_postprocess_picks_the_best_valid_span():
    offsets = _window()  # context words are tokens 5..12
    n = len(offsets)
    # The best start (1) and end (2) are question tokens, and end 6 comes before start 8: all skipped.
    start = _logits(n, {1: 9.0, 8: 5.0, 6: 4.0})
    end = _logits(n, {2: 9.0, 6: 6.0, 9: 3.0})
    got = _one(start, end, offsets)
    assert got.text == "beta" and got.score == pytest.approx(10.0)  # tokens 6..6: 4 + 6 beats 8..9: 5 + 3
    assert got.null_odds is None and 0 < got.probability < 1


def test_postprocess_respects_max_answer_length():
    offsets = _window()
    start, end = _logits(len(offsets), {5: 5.0, 9: 1.5}), _logits(len(offsets), {12: 5.0, 10: 1.0})
    assert _one(start, end, offsets, max_answer_length=30).text == CONTEXT  # tokens 5..12 score 10
    assert _one(start, end, offsets, max_answer_length=8).text == CONTEXT  # 8 tokens
    # Too long now: 9..12 (1.5 + 5) beats 5..10 (5 + 1) and 9..10 (1.5 + 1).
    assert _one(start, end, offsets, max_answer_length=7).text == "epsilon zeta eta theta"


def test_postprocess_v2_null_threshold_and_windows():
    offsets = _window()
    n = len(offsets)
    # Two windows of one question: null scores 2 and 1 (the lower counts), best span 'gamma' scores 3.
    w1 = (_logits(n, {0: 1.0, 7: 2.0}), _logits(n, {0: 1.0, 7: 1.0}))
    w2 = (_logits(n, {0: 0.5}), _logits(n, {0: 0.5}))
    args = (["q"], [CONTEXT], ["q", "q"], [offsets, offsets], [w1[0], w2[0]], [w1[1], w2[1]])
    got = postprocess(*args, version_2=True)["q"]
    assert got.text == "gamma" and got.null_odds == pytest.approx(1.0 - 3.0)
    got = postprocess(*args, version_2=True, null_score_diff_threshold=-2.5)["q"]
    assert got.text == "" and got.score == pytest.approx(1.0) and got.null_odds == pytest.approx(-2.0)


def _reference_best(start, end, offsets, n_best, max_len):
    """run_qa's double loop over the top-n starts and ends, for comparison."""
    best = None
    for s in np.argsort(start)[-1 : -n_best - 1 : -1]:
        for e in np.argsort(end)[-1 : -n_best - 1 : -1]:
            if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_len:
                continue
            if best is None or start[s] + end[e] > best[0]:
                best = (start[s] + end[e], offsets[s][0], offsets[e][1])
    return best


def test_window_candidates_match_the_double_loop():
    rng = np.random.default_rng(0)
    context_tokens = np.arange(24)[:, None] * 4 + [0, 3]  # 24 context tokens, then [SEP]
    offsets = np.concatenate([[[-1, -1]] * 6, context_tokens, [[-1, -1]]])
    for n_best, max_len in [(20, 30), (5, 3), (3, 1)]:
        for _ in range(50):
            start, end = rng.normal(size=(2, len(offsets))).astype(np.float32)
            scores, s_char, e_char = window_candidates(start, end, offsets, n_best, max_len)
            ref = _reference_best(start, end, offsets, n_best, max_len)
            if ref is None:
                assert len(scores) == 0
                continue
            b = np.argmax(scores)
            assert (scores[b], s_char[b], e_char[b]) == pytest.approx(ref)


# --- the task's evaluation end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def _oracle_outputs(eval_set):
    """Logits that point at an answer of each question (or at [CLS] for no-answer questions).
    The answer is the first reference whose characters start and end on token boundaries: a few
    references are part of a token ('8' in '18'), which no span of tokens gives exactly."""
    ids, offsets = eval_set.features["example_id"][:], offset_rows(eval_set.features)
    bounds = {}
    for qid, o in zip(ids, offsets):
        starts, ends = bounds.setdefault(qid, (set(), set()))
        starts.update(o[:, 0].tolist())
        ends.update(o[:, 1].tolist())
    target = {}
    for row in eval_set.examples:
        spans = [(a, a + len(t)) for t, a in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        starts, ends = bounds[row["id"]]
        target[row["id"]] = next(((a, b) for a, b in spans if a in starts and b in ends), None)
    result = {"start_logits": [], "end_logits": []}
    for qid, o in zip(ids, offsets):
        start, end = np.zeros(len(o), np.float32), np.zeros(len(o), np.float32)
        if target[qid] is None:
            start[0] = end[0] = 10.0
        elif target[qid][0] in o[:, 0] and target[qid][1] in o[:, 1]:
            start[list(o[:, 0]).index(target[qid][0])] = end[list(o[:, 1]).index(target[qid][1])] = 10.0
        result["start_logits"].append(start)
        result["end_logits"].append(end)
    return result


@pytest.mark.parametrize(
    "task_class, eval_file",
    [(SquadTask, DEMO_DIR / "dev.json"), (SquadV2Task, "/work/shared/data/squad/dev-v2.0-first5.json")],
)
def test_oracle_logits_score_100(task_class, eval_file, tokenizer, tmp_path):
    run = tasks.make_run(
        task_class.names[0], eval_file=str(eval_file), max_eval_samples=150, max_seq_length=128, doc_stride=32
    )
    task = tasks.build(run, tokenizer)
    assert type(task) is task_class
    eval_set = task.eval_set()
    assert len(eval_set.examples) == 150 and len(eval_set.features) > 150  # some contexts need several windows
    metrics = task.compute_metrics(eval_set, _oracle_outputs(eval_set), tmp_path)
    assert metrics["exact_match"] == 100.0 and metrics["f1"] == 100.0
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert list(predictions) == eval_set.examples["id"][:]
    if task.version_2:
        assert metrics["NoAns_total"] > 0 and metrics["HasAns_exact"] == 100.0 and metrics["best_f1"] == 100.0
        null_odds = json.loads((tmp_path / "null_odds.json").read_text())
        assert {q for q, v in null_odds.items() if v > 0} == {q for q, t in predictions.items() if not t}


def test_real_model_eval_batches_and_answer(tokenizer, tmp_path):
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(0)
    run = tasks.make_run(
        "squad_v2",
        eval_file=str(DEMO_DIR / "dev.json"),
        max_eval_samples=12,
        max_seq_length=96,
        doc_stride=32,
        max_query_length=32,
    )
    task = tasks.build(run, tokenizer)
    assert type(task) is SquadV2Task
    model = build_model("tiny", task.model_class()).eval()
    assert isinstance(model, torch.nn.Module) and task.model_class() is AutoModelForQuestionAnswering
    eval_set = task.eval_set()
    outputs = {"start_logits": [], "end_logits": []}
    rows = list(eval_set.features)
    for i in range(0, len(rows), 5):
        batch = task.collate(rows[i : i + 5])
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
        with torch.no_grad():
            out = model(**batch)
        for key, values in task.eval_outputs(out, batch).items():
            outputs[key].extend(values)
    assert [len(x) for x in outputs["start_logits"]] == [len(r["input_ids"]) for r in rows]
    metrics = task.compute_metrics(eval_set, outputs, None)
    assert {"exact", "f1", "total", "HasAns_f1", "best_f1_thresh", "exact_match"} <= set(metrics)
    assert metrics["total"] == 12

    context = eval_set.examples[0]["context"]
    text, probability = answer(model, tokenizer, eval_set.examples[0]["question"], context, task)
    assert text in context and 0.0 <= probability <= 1.0

"""The official SQuAD metrics, re-implemented line for line from evaluate-v1.1.py and
evaluate-v2.0.py (same normalisation, same max over references, same no-answer threshold search),
taking dicts instead of the dataset JSON: predictions {id: text}, references {id: [answer texts]}.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (both official scripts;
    translate drops the same characters as their `ch not in set(string.punctuation)`, faster)."""
    s = s.lower().translate(_NO_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


# --- v1.1 ------------------------------------------------------------------------------------------


def f1_score_v1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score_v1(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def squad_v1(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """{'exact_match', 'f1'} on a 0-100 scale; a question without a prediction scores 0."""
    f1 = exact_match = total = 0
    for qid, ground_truths in references.items():
        total += 1
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact_match += max(exact_match_score_v1(prediction, gt) for gt in ground_truths)
        f1 += max(f1_score_v1(prediction, gt) for gt in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --- v2.0 ------------------------------------------------------------------------------------------


def get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    num_same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)  # no-answer on either side: 1 if both agree, else 0
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def get_raw_scores(predictions, references):
    exact_scores, f1_scores = {}, {}
    for qid, answers in references.items():
        gold_answers = [a for a in answers if normalize_answer(a)] or [""]  # unanswerable: only '' is right
        if qid not in predictions:
            continue
        a_pred = predictions[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in gold_answers)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in gold_answers)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores, na_probs, qid_to_has_ans, na_prob_thresh):
    return {qid: float(not qid_to_has_ans[qid]) if na_probs[qid] > na_prob_thresh else s for qid, s in scores.items()}


def make_eval_dict(exact_scores, f1_scores, qid_list=None) -> dict:
    qids = qid_list if qid_list else list(exact_scores)
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact_scores[k] for k in qids) / total,
        "f1": 100.0 * sum(f1_scores[k] for k in qids) / total,
        "total": total,
    }


def find_best_thresh(predictions, scores, na_probs, qid_to_has_ans):
    """Best score when predicting no-answer for every question whose na_prob is above a threshold,
    searched over the na_prob values themselves (questions taken in rising na_prob order)."""
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def squad_v2(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """evaluate-v2.0.py's output: exact, f1, total, HasAns_*, NoAns_* and, when na_probs are given
    (its --na-prob-file), best_exact, best_exact_thresh, best_f1, best_f1_thresh.
    References with no answer text mark unanswerable questions."""
    given = na_probs is not None
    na_probs = na_probs if given else {k: 0.0 for k in predictions}
    qid_to_has_ans = {qid: bool(answers) for qid, answers in references.items()}
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    exact_raw, f1_raw = get_raw_scores(predictions, references)
    exact_thresh = apply_no_ans_threshold(exact_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, na_probs, qid_to_has_ans, na_prob_thresh)
    out = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        out.update({f"HasAns_{k}": v for k, v in make_eval_dict(exact_thresh, f1_thresh, has_ans_qids).items()})
    if no_ans_qids:
        out.update({f"NoAns_{k}": v for k, v in make_eval_dict(exact_thresh, f1_thresh, no_ans_qids).items()})
    if given:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact_raw, na_probs, qid_to_has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, qid_to_has_ans)
    return out

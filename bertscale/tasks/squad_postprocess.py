"""Start/end logits of every window -> one answer text per question (n-best search, as HF
run_qa.py's utils_qa does it, but with numpy: the top-k starts and top-k ends of a window are
scored as a k x k grid at once, and impossible pairs are masked out).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Answer(NamedTuple):
    text: str
    score: float  # start + end logit of the chosen span (the null score when text is '')
    probability: float  # softmax over the n-best spans (plus the null answer for v2)
    null_odds: float | None  # v2: null score - best span score (the official script's na_prob); v1: None


def window_candidates(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, n_best_size: int, max_answer_length: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid spans among the top-n_best starts x top-n_best ends of one window.

    offsets: (tokens, 2) character offsets, negative for tokens outside the context. Returns
    (scores, start_chars, end_chars) of the spans inside the context with end >= start, at most
    max_answer_length tokens and non-empty text."""
    k = min(n_best_size, len(start_logits))
    starts = _top(start_logits, k)[:, None]
    ends = _top(end_logits, k)[None, :]
    in_context = offsets[:, 0] >= 0
    valid = (
        in_context[starts]
        & in_context[ends]
        & (ends >= starts)
        & (ends - starts < max_answer_length)
        & (offsets[ends, 1] > offsets[starts, 0])
    )
    rows, cols = np.nonzero(valid)
    s, e = starts[rows, 0], ends[0, cols]
    return start_logits[s] + end_logits[e], offsets[s, 0], offsets[e, 1]


def _top(x: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-x, k - 1)[:k] if k < len(x) else np.arange(len(x))


def postprocess(
    example_ids: Sequence[str],
    contexts: Sequence[str],
    feature_example_ids: Sequence[str],
    offsets: Sequence[np.ndarray],
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, Answer]:
    """One Answer per example id. Features (windows) are matched to examples by example id; each
    feature's offsets and logits have the same length (its real, unpadded tokens)."""
    windows = defaultdict(list)
    for f, qid in enumerate(feature_example_ids):
        windows[qid].append(f)

    answers = {}
    for qid, context in zip(example_ids, contexts):
        found = [
            window_candidates(start_logits[f], end_logits[f], offsets[f], n_best_size, max_answer_length)
            for f in windows.get(qid, ())
        ]
        scores, start_chars, end_chars = (np.concatenate(column) for column in zip(*found)) if found else ([],) * 3
        n_best = np.sort(scores)[::-1][:n_best_size]  # the best span comes first
        if len(scores):
            b = int(np.argmax(scores))
            text, score = context[int(start_chars[b]) : int(end_chars[b])], float(scores[b])
        else:
            text, score = "", 0.0  # no valid span in any window: like run_qa's fallback, it scores 0
        if not version_2:
            answers[qid] = Answer(text, score, _probability(n_best, 0) if text else 0.0, None)
            continue
        # The null answer scores [CLS] start + end, the lowest over the question's windows (run_qa's rule).
        null = min((float(start_logits[f][0] + end_logits[f][0]) for f in windows.get(qid, ())), default=0.0)
        diff = null - score
        pool = np.append(n_best, null)
        if diff > null_score_diff_threshold or not text:
            answers[qid] = Answer("", null, _probability(pool, -1), diff)
        else:
            answers[qid] = Answer(text, score, _probability(pool, 0), diff)
    return answers


def _probability(scores: np.ndarray, index: int) -> float:
    """Softmax of scores, at index."""
    e = np.exp(scores - scores.max())
    return float(e[index] / e.sum())

"""SQuAD examples -> model rows, as HF run_qa.py builds them: question + context windows of at most
max_seq_length tokens that overlap by doc_stride tokens, no padding (collate pads per batch).

Train rows carry start/end token labels (the [CLS] index when the answer is not inside the
window); eval rows carry example_id and the character offsets of context tokens ([-1, -1] for
question and special tokens) for post-processing.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from bisect import bisect_left, bisect_right
from itertools import chain
from operator import itemgetter
from pathlib import Path

import numpy as np

from ..errors import UserError

NOT_CONTEXT = -1  # offset_mapping value of tokens that are not part of the context
# Below this many examples, starting worker processes costs more than it saves.
MIN_EXAMPLES_FOR_WORKERS = 1000


def window_settings(max_seq_length: int, args, tokenizer) -> dict:
    """max_seq_length / doc_stride / max_query_length (`args`: the squad flags), checked so that every
    window has room for context tokens beyond the overlap (the tokenizer's own error is obscure)."""
    limit = getattr(tokenizer, "model_max_length", max_seq_length)
    if max_seq_length > limit:
        warnings.warn(
            f"--max-seq-length {max_seq_length} is longer than the model allows ({limit}); using {limit}.", stacklevel=2
        )
        max_seq_length = limit
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_seq_length - args.max_query_length - specials
    if args.max_query_length < 1 or args.doc_stride < 0 or args.doc_stride >= room:
        raise UserError(
            f"--doc-stride {args.doc_stride} must be below the context room of a window: --max-seq-length "
            f"{max_seq_length} - --max-query-length {args.max_query_length} - {specials} special tokens = {room}. "
            f"Lower --doc-stride or --max-query-length, or raise --max-seq-length."
        )
    return {"max_seq_length": max_seq_length, "doc_stride": args.doc_stride, "max_query_length": args.max_query_length}


def build_features(
    examples,
    tokenizer,
    *,
    training: bool,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    workers: int = 1,
):
    """A datasets.Dataset of windows, tokenised in batches by the fast tokenizer (cached by datasets
    when the examples come from files or the hub)."""
    num_proc = workers if workers > 1 and len(examples) > MIN_EXAMPLES_FOR_WORKERS else None
    window = dict(max_seq_length=max_seq_length, doc_stride=doc_stride, max_query_length=max_query_length)
    return examples.map(
        prepare_train_features if training else prepare_eval_features,
        batched=True,
        remove_columns=examples.column_names,
        num_proc=num_proc,
        fn_kwargs=dict(tokenizer=tokenizer, **window),
        new_fingerprint=windows_fingerprint(examples, tokenizer, training, window),
        desc="Tokenising SQuAD " + ("train" if training else "eval") + " windows",
    )


def windows_fingerprint(examples, tokenizer, training: bool, window: dict):
    """The cache key of the tokenised windows: the examples, the tokenizer's full definition, the
    settings and this file's source (so a code change never reuses old windows). datasets would
    otherwise pickle the tokenizer to hash it, which costs more than tokenising 1000 questions.
    None (datasets hashes) for tokenizers without a serialisable fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(examples, "_fingerprint", None) is None:
        return None
    # Calling the tokenizer leaves its last truncation/padding call in the backend: not part of its identity.
    definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    h = hashlib.sha256()
    for part in (
        examples._fingerprint,
        type(tokenizer).__name__,
        tokenizer.padding_side,
        json.dumps(definition, sort_keys=True),
        json.dumps(window, sort_keys=True),
        str(training),
        Path(__file__).read_text(),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def prepare_train_features(examples: dict, tokenizer, **window) -> dict:
    enc, context_id = tokenize_windows(examples, tokenizer, **window)
    sample_of = enc.pop("overflow_to_sample_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(enc.pop("offset_mapping")):
        answers = examples["answers"][sample_of[i]]
        span = None
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            span = answer_tokens(
                offsets, enc.sequence_ids(i), context_id, start_char, start_char + len(answers["text"][0])
            )
        if span is None:
            cls = cls_index(enc["input_ids"][i], tokenizer)
            span = (cls, cls)
        starts.append(span[0])
        ends.append(span[1])
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    return dict(enc)


def prepare_eval_features(examples: dict, tokenizer, **window) -> dict:
    enc, context_id = tokenize_windows(examples, tokenizer, **window)
    sample_of = enc.pop("overflow_to_sample_mapping")
    offset_rows = []
    for i, offsets in enumerate(enc.pop("offset_mapping")):
        first, last = context_range(enc.sequence_ids(i), context_id)
        row = np.fromiter(chain.from_iterable(offsets), dtype=np.int32, count=2 * len(offsets)).reshape(-1, 2)
        row[:first] = NOT_CONTEXT
        row[last + 1 :] = NOT_CONTEXT
        offset_rows.append(row)
    enc["example_id"] = [examples["id"][s] for s in sample_of]
    enc["offset_mapping"] = offset_rows
    return dict(enc)


def tokenize_windows(examples: dict, tokenizer, *, max_seq_length: int, doc_stride: int, max_query_length: int):
    """Tokenise question/context pairs into overlapping windows; returns the encoding and the
    sequence id of the context (1, or 0 for left-padding tokenizers that put the context first)."""
    pad_on_right = tokenizer.padding_side == "right"
    context_id, question_id = (1, 0) if pad_on_right else (0, 1)

    def encode(questions):
        first, second = (questions, examples["context"]) if pad_on_right else (examples["context"], questions)
        return tokenizer(
            first,
            second,
            truncation="only_second" if pad_on_right else "only_first",
            max_length=max_seq_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=False,
        )

    # Questions longer than max_query_length tokens are rare: find them in the windows and only
    # then tokenise the questions alone to cut them, rather than paying for it on every batch.
    questions = [q.lstrip() for q in examples["question"]]
    try:
        enc = encode(questions)
    except Exception as e:  # the tokenizer's error when a question leaves no room for the context
        if "Truncation error" not in str(e):
            raise
        enc = None
    if enc is None or any(
        enc.sequence_ids(i).count(question_id) > max_query_length for i in range(len(enc["input_ids"]))
    ):
        enc = encode(truncate_questions(questions, tokenizer, max_query_length))
    return enc, context_id


def truncate_questions(questions: list[str], tokenizer, max_query_length: int) -> list[str]:
    """Cut questions longer than max_query_length tokens at a word boundary, so that re-tokenising
    the cut text gives at most max_query_length tokens (the pair call cannot cap the first text)."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = list(questions)
    for i, ids in enumerate(enc["input_ids"]):
        if len(ids) <= max_query_length:
            continue
        words = enc.word_ids(i)
        keep = max_query_length
        while keep > 0 and words[keep] == words[keep - 1]:  # do not split a word between its pieces
            keep -= 1
        cut = enc["offset_mapping"][i][keep][0] if keep > 0 else enc["offset_mapping"][i][max_query_length - 1][1]
        out[i] = questions[i][:cut]
    return out


def context_range(sequence_ids: list, context_id: int) -> tuple[int, int]:
    """First and last token index of the context in one window."""
    first = sequence_ids.index(context_id)
    last = len(sequence_ids) - 1 - sequence_ids[::-1].index(context_id)
    return first, last


def answer_tokens(offsets, sequence_ids, context_id: int, start_char: int, end_char: int):
    """(start, end) token indices of the answer's characters in this window, or None when the
    window does not hold the whole answer. Same rule as run_qa.py (the last context token that
    starts at or before start_char, the first one that ends at or after end_char), found by
    binary search over the context's offsets, which rise monotonically."""
    first, last = context_range(sequence_ids, context_id)
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return None
    start = bisect_right(offsets, start_char, first, last + 1, key=itemgetter(0)) - 1
    end = bisect_left(offsets, end_char, first, last + 1, key=itemgetter(1))
    return start, end


def cls_index(input_ids: list, tokenizer) -> int:
    cls = tokenizer.cls_token_id
    return input_ids.index(cls) if cls is not None and cls in input_ids else 0

"""Pretraining data: text files or hub datasets -> documents -> sentences -> NSP sentence pairs.

Pairs are built the way Google's BERT create_pretraining_data.py builds them: segment A is a
run of consecutive sentences; half the time B is the true continuation (next_sentence_label 0,
as transformers' BertForPreTraining expects), otherwise a random stretch of another document
(label 1). Masking is not done here: it happens per batch in masking.py.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path

from .. import hub
from ..errors import UserError

SEPARATORS = ("blank-line", "file", "heading")
IS_NEXT, RANDOM_NEXT = 0, 1
TOKENIZE_BATCH = 1000  # sentences per fast-tokenizer call
DOCS_PER_SHARD = 1000  # streaming: pairs are built within shards of this many documents

_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")
_TOP_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # WikiText ' = Title = '; ' = = Sub = = ' is not top
_ANY_HEADING = re.compile(r"^ ?=( =)* .* =( =)* ?$")
# A sentence ends at . ! ? (plus closing quotes/brackets) followed by space and a capital, digit or
# opening quote. Abbreviations and initials ("Mr. Darcy", "J. Smith") are checked separately.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "jr",
    "sr",
    "prof",
    "vs",
    "no",
    "mt",
    "rev",
    "gen",
    "col",
    "capt",
    "lt",
    "sgt",
    "fig",
    "vol",
    "ch",
    "etc",
    "inc",
    "co",
    "ltd",
    "e.g",
    "i.e",
}


# --- reading ---------------------------------------------------------------------------------
def normalize_text(raw: str) -> str:
    """Drop a UTF-8 BOM, turn CRLF/CR line ends into LF, strip a Project Gutenberg wrapper."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text)


def strip_gutenberg(text: str) -> str:
    """Keep only the lines between '*** START OF' and '*** END OF' (licence boilerplate is not prose)."""
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("*** START OF")), None)
    end = next((i for i, ln in enumerate(lines) if ln.strip().startswith("*** END OF")), None)
    if start is None and end is None:
        return text
    lo = 0 if start is None else start + 1
    hi = len(lines) if end is None or end < lo else end
    return "\n".join(lines[lo:hi])


def clean_document(text: str) -> str:
    """A document given whole (a .jsonl record, a hub row) as one line of normalised text."""
    return " ".join(normalize_text(text).split())


def split_documents(text: str, separator: str) -> list[str]:
    """One file's text -> documents, each with its hard-wrapped lines joined by spaces."""
    if separator == "file":
        docs = [text]
    elif separator == "blank-line":
        docs = _BLANK_LINES.split(text)
    elif separator == "heading":
        docs, current = [], []
        for line in text.split("\n"):
            if _TOP_HEADING.match(line):
                docs.append("\n".join(current))
                current = []
            elif not _ANY_HEADING.match(line):  # section headings are not sentences
                current.append(line)
        docs.append("\n".join(current))
    else:
        raise UserError(f"--document-separator {separator!r}: use one of {', '.join(SEPARATORS)}.")
    joined = (" ".join(doc.split()) for doc in docs)
    return [doc for doc in joined if doc]


def expand_globs(patterns: Iterable[str], flag: str) -> list[Path]:
    files = []
    for pattern in patterns:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matched:
            raise UserError(
                f"{flag} {pattern!r}: matches no file. Check the path (quote globs so the shell does not expand them)."
            )
        files.extend(Path(p) for p in matched)
    if not files:
        raise UserError(f"{flag}: no files given. Pass one or more text globs (.txt, .txt.gz, .jsonl).")
    return files


def read_file_documents(path: Path, separator: str, text_field: str) -> list[str]:
    """Documents of one .txt/.txt.gz (split by `separator`) or .jsonl[.gz] (one per line) file."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            if name.endswith(".jsonl"):
                return _jsonl_documents(f, path, text_field)
            return split_documents(normalize_text(f.read()), separator)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}). Convert it to UTF-8.") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read it ({e}).") from None


def _jsonl_documents(lines, path: Path, text_field: str) -> list[str]:
    docs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e.msg}).") from None
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{path}:{number}: no {text_field!r} field. Name the text field with --text-field.")
        text = clean_document(str(record[text_field] or ""))
        if text:
            docs.append(text)
    return docs


def read_documents(
    patterns: Iterable[str], separator: str, text_field: str, flag: str = "--train-files"
) -> tuple[list[str], str]:
    """All documents of the files the globs match, and a summary line for error messages."""
    files = expand_globs(patterns, flag)
    docs = [doc for path in files for doc in read_file_documents(path, separator, text_field)]
    shown = " ".join(repr(p) for p in patterns)
    summary = (
        f"{flag} {shown}: {len(files)} file{'s' * (len(files) != 1)}, "
        f"{len(docs)} document{'s' * (len(docs) != 1)} with text"
    )
    if not docs:
        raise UserError(f"{summary}. Give files with text (documents are split by --document-separator {separator}).")
    return docs, summary


def load_hub_documents(name: str, config: str | None, text_field: str, streaming: bool = False):
    """The train split of a hub dataset (or a local dataset directory): a list of documents, or
    with `streaming` an IterableDataset of raw records, read lazily."""
    ds = hub.load_split(
        name, config, "train", streaming=streaming, hint="Check the name and --dataset-config, or use --train-files."
    )
    if text_field not in (ds.column_names or ()):
        raise UserError(
            f"--dataset {name}: no {text_field!r} column (columns: {ds.column_names}). "
            f"Name the text column with --text-field."
        )
    if streaming:
        return ds
    docs = [d for d in (clean_document(t or "") for t in ds[text_field]) if d]
    if not docs:
        raise UserError(f"--dataset {name}: {len(ds)} rows, 0 documents with text in {text_field!r}.")
    return docs


def hold_out(documents: list, percentage: float, seed: int) -> tuple[list, list]:
    """(train, held-out) documents: a seeded random `percentage` percent, at least one, held out."""
    if percentage <= 0:
        return documents, []
    n_eval = max(1, round(len(documents) * percentage / 100))
    held = set(random.Random(seed).sample(range(len(documents)), min(n_eval, len(documents))))
    train = [d for i, d in enumerate(documents) if i not in held]
    return train, [d for i, d in enumerate(documents) if i in held]


# --- sentences and tokens --------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    sentences, begin = [], 0
    for m in _SENTENCE_END.finditer(text):
        words = text[begin : m.start()].rsplit(None, 1)
        last = words[-1].lower() if words else ""
        if m.group() == "." and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        sentences.append(text[begin : m.end()].strip())
        begin = m.end()
    sentences.append(text[begin:].strip())
    return [s for s in sentences if s]


def tokenize_documents(documents: list[str], tokenizer, max_piece: int) -> list[list[tuple[list, list]]]:
    """Documents -> per document a list of sentences, each (token ids, word-start flags).

    Sentences longer than `max_piece` tokens are cut into pieces: truncation stays cheap, and a
    long sentence can still give an IsNext pair (a one-sentence chunk always gets a random B).
    """
    sentence_lists = [split_sentences(doc) for doc in documents]
    flat = [s for sentences in sentence_lists for s in sentences]
    encoded = []
    for lo in range(0, len(flat), TOKENIZE_BATCH):
        enc = tokenizer(
            flat[lo : lo + TOKENIZE_BATCH],
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for i, ids in enumerate(enc["input_ids"]):
            encoded.append((ids, _word_starts(enc.word_ids(i))))
    out, k = [], 0
    for sentences in sentence_lists:
        doc = []
        for ids, starts in encoded[k : k + len(sentences)]:
            for lo in range(0, len(ids), max_piece):
                piece_starts = starts[lo : lo + max_piece]
                piece_starts[0] = 1
                doc.append((ids[lo : lo + max_piece], piece_starts))
        k += len(sentences)
        if doc:
            out.append(doc)
    return out


def _word_starts(word_ids: list[int | None]) -> list[int]:
    """1 where a new word begins (WordPiece '##' pieces continue the previous word), else 0."""
    return [int(i == 0 or w != word_ids[i - 1]) for i, w in enumerate(word_ids)]


# --- sentence pairs --------------------------------------------------------------------------
def create_pairs(
    documents: list[list[tuple[list, list]]],
    max_seq_length: int,
    short_seq_prob: float,
    rng: random.Random,
    cls_id: int,
    sep_id: int,
) -> dict[str, list]:
    """NSP pairs from tokenised documents, as columns (input_ids, token_type_ids, word_start,
    next_sentence_label), shuffled."""
    rows = []
    for index in range(len(documents)):
        rows.extend(_document_pairs(documents, index, max_seq_length - 3, short_seq_prob, rng, cls_id, sep_id))
    rng.shuffle(rows)
    names = ("input_ids", "token_type_ids", "word_start", "next_sentence_label")
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


def _document_pairs(documents, index, max_tokens, short_seq_prob, rng, cls_id, sep_id):
    """Google's create_instances_from_document, except that the short target length is drawn
    per pair rather than once per document (a one-document book would otherwise be all-short)."""
    document = documents[index]
    target = _target_length(max_tokens, short_seq_prob, rng)
    chunk, chunk_len, i = [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i][0])
        if i == len(document) - 1 or chunk_len >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = _concat(chunk[:a_end])
            if len(chunk) == 1 or rng.random() < 0.5:
                label = RANDOM_NEXT
                b = _random_segment(documents, index, target - len(a[0]), rng)
                i -= len(chunk) - a_end  # the unused sentences start the next pair
            else:
                label = IS_NEXT
                b = _concat(chunk[a_end:])
            truncate_seq_pair(a, b, max_tokens, rng)
            if a[0] and b[0]:
                yield _row(a, b, label, cls_id, sep_id)
            chunk, chunk_len = [], 0
            target = _target_length(max_tokens, short_seq_prob, rng)
        i += 1


def _target_length(max_tokens: int, short_seq_prob: float, rng: random.Random) -> int:
    return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens


def _random_segment(documents, index, target, rng):
    other = index
    for _ in range(10):  # a single-document corpus falls back to itself, as in Google's code
        other = rng.randint(0, len(documents) - 1)
        if other != index:
            break
    document = documents[other]
    ids, starts = [], []
    for sentence_ids, sentence_starts in document[rng.randint(0, len(document) - 1) :]:
        ids.extend(sentence_ids)
        starts.extend(sentence_starts)
        if len(ids) >= target:
            break
    return [ids, starts]


def _concat(sentences) -> list[list]:
    return [[t for ids, _ in sentences for t in ids], [s for _, starts in sentences for s in starts]]


def truncate_seq_pair(a: list[list], b: list[list], max_tokens: int, rng: random.Random) -> None:
    """Trim [ids, word_start] segments in place to max_tokens together: one token at a time from
    the longer one, randomly from its front or back (so the model sees cut edges on both sides)."""
    while len(a[0]) + len(b[0]) > max_tokens:
        longer = a if len(a[0]) > len(b[0]) else b
        if rng.random() < 0.5:
            del longer[0][0], longer[1][0]
        else:
            longer[0].pop()
            longer[1].pop()


def _row(a, b, label, cls_id, sep_id):
    # Special tokens and the (possibly cut) first token of each segment start a word, so that
    # whole-word masking never joins pieces across [CLS]/[SEP].
    ids = [cls_id, *a[0], sep_id, *b[0], sep_id]
    starts = [1, 1, *a[1][1:], 1, 1, *b[1][1:], 1]
    types = [0] * (len(a[0]) + 2) + [1] * (len(b[0]) + 1)
    return ids, types, starts, label


def build_pairs(
    documents: list[str], tokenizer, max_seq_length: int, short_seq_prob: float, seed: int
) -> dict[str, list]:
    """Text documents -> NSP pair columns, deterministic given `seed`."""
    tokenized = tokenize_documents(documents, tokenizer, max_piece=max(1, (max_seq_length - 3) // 2))
    return create_pairs(
        tokenized, max_seq_length, short_seq_prob, random.Random(seed), tokenizer.cls_token_id, tokenizer.sep_token_id
    )


def streamed_pairs(stream, text_field: str, tokenizer, max_seq_length: int, short_seq_prob: float, seed: int):
    """An IterableDataset of NSP pairs built on the fly, shard by shard of documents, for corpora
    larger than memory. Random B segments come from the same shard."""

    def pairs_of_shard(batch, indices):
        docs = [d for d in (clean_document(t or "") for t in batch[text_field]) if d]
        return build_pairs(docs, tokenizer, max_seq_length, short_seq_prob, seed + indices[0])

    return stream.map(
        pairs_of_shard, batched=True, batch_size=DOCS_PER_SHARD, with_indices=True, remove_columns=stream.column_names
    )

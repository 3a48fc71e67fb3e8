"""Pretraining data: text files or hub datasets -> documents -> sentences -> NSP sentence pairs.

Pairs are built the way Google's BERT create_pretraining_data.py builds them: segment A is a
run of consecutive sentences; half the time B is the true continuation (next_sentence_label 0,
as transformers' BertForPreTraining expects), otherwise a random stretch of another document
(label 1). Masking is not done here: it happens per batch in masking.py.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import mmap
import os
import random
import re
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers

from .. import hub
from ..errors import UserError

SEPARATORS = ("blank-line", "file", "heading")
IS_NEXT, RANDOM_NEXT = 0, 1
TOKENIZE_BATCH = 1000  # sentences per fast-tokenizer call
DOCS_PER_SHARD = 1000  # streaming: pairs are built within shards of this many documents

_BLANK_LINE = re.compile(r"[ \t\f\v]*")  # only these: a line of other whitespace does not split
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
# Files are read line by line: a file of any size streams through, and only the document being
# built is held (with --document-separator file, a whole file or book is one document).
BOOK_BREAK = None  # between the bodies of concatenated Project Gutenberg books: ends a document


def normalize_text(raw: str) -> str:
    """Drop a UTF-8 BOM, turn CRLF/CR line ends into LF, strip Project Gutenberg wrappers."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg(text)


def gutenberg_marker(line: str) -> str | None:
    stripped = line.strip()
    if stripped.startswith("*** START OF"):
        return "start"
    if stripped.startswith("*** END OF"):
        return "end"
    return None


def gutenberg_bodies(lines: Iterable[str], first_marker: str | None) -> Iterator[str | None]:
    """The lines between each '*** START OF' and the next '*** END OF' (licence headers and footers
    are not prose), with BOOK_BREAK at every marker, so that each book of a file of concatenated
    books is kept. Text before the first marker is kept unless that marker is a START."""
    keep = first_marker != "start"
    for line in lines:
        marker = gutenberg_marker(line)
        if marker:
            keep = marker == "start"
            yield BOOK_BREAK
        elif keep:
            yield line


def strip_gutenberg(text: str) -> str:
    """`text` without Project Gutenberg headers and footers; the bodies of several books are
    joined by a blank line."""
    lines = text.split("\n")
    first = next((m for m in map(gutenberg_marker, lines) if m), None)
    if first is None:
        return text
    bodies, body = [], []
    for line in gutenberg_bodies(lines, first):
        if line is BOOK_BREAK:
            bodies.append(body)
            body = []
        else:
            body.append(line)
    bodies.append(body)
    return "\n\n".join("\n".join(b) for b in bodies if b)


def clean_document(text: str) -> str:
    """A document given whole (a .jsonl record, a hub row) as one line of normalised text."""
    return " ".join(normalize_text(text).split())


def split_documents(text: str, separator: str) -> list[str]:
    """One file's text -> documents, each with its hard-wrapped lines joined by spaces."""
    return list(documents_of_lines(text.split("\n"), separator))


def documents_of_lines(lines: Iterable[str | None], separator: str) -> Iterator[str]:
    """Lines (without line ends; BOOK_BREAK ends a document) -> documents, each with its
    hard-wrapped lines joined by spaces; empty ones are skipped."""
    if separator not in SEPARATORS:
        raise UserError(f"--document-separator {separator!r}: use one of {', '.join(SEPARATORS)}.")
    words: list[str] = []
    for line in lines:
        if line is BOOK_BREAK:
            ends, keep = True, False
        elif separator == "blank-line":
            ends, keep = _BLANK_LINE.fullmatch(line) is not None, True
        elif separator == "heading":
            ends, keep = _TOP_HEADING.match(line) is not None, not _ANY_HEADING.match(line)
        else:
            ends, keep = False, True
        if ends and words:
            yield " ".join(words)
            words = []
        if keep and not ends:
            words.extend(line.split())
    if words:
        yield " ".join(words)


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
    return list(iter_file_documents(path, separator, text_field))


def iter_file_documents(path: Path, separator: str, text_field: str) -> Iterator[str]:
    """The documents of one file, read line by line. A file that is not UTF-8 or cannot be read
    raises a UserError that names it."""
    if separator not in SEPARATORS:
        raise UserError(f"--document-separator {separator!r}: use one of {', '.join(SEPARATORS)}.")
    path = Path(path)
    jsonl = (path.name.removesuffix(".gz")).endswith(".jsonl")
    try:
        if jsonl:
            with _open_text(path, newline="") as f:
                yield from _jsonl_documents(f, path, text_field)
            return
        first_marker = _first_gutenberg_marker(path)
        with _open_text(path, newline=None) as f:  # newline=None: CRLF and CR become LF
            lines = (line.removesuffix("\n") for line in f)
            yield from documents_of_lines(gutenberg_bodies(_without_bom(lines), first_marker), separator)
    except UnicodeDecodeError:
        raise UserError(
            f"{path}: not UTF-8 text ({_first_bad_byte(path)}). Convert it to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8), or leave it out."
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{path}: cannot read it ({e}). Check the file (permissions, a truncated download or .gz), or leave it out."
        ) from None


def _open_text(path: Path, newline: str | None):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline=newline)


def _without_bom(lines: Iterator[str]) -> Iterator[str]:
    for i, line in enumerate(lines):
        yield line.lstrip("\ufeff") if i == 0 else line


def _first_gutenberg_marker(path: Path) -> str | None:
    """'start', 'end' or None: whether the text before the first marker is a licence header.
    Files without the marker text at all (most) are ruled out by a fast byte search."""
    if not path.name.endswith(".gz"):
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(b"*** START OF") < 0 and m.find(b"*** END OF") < 0:
                    return None
    with _open_text(path, newline=None) as f:
        return next((m for m in map(gutenberg_marker, f) if m), None)


def _first_bad_byte(path: Path) -> str:
    """Where a file stops being UTF-8: 'line L, byte B' (B counted from the start of the file)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.name.endswith(".gz") else open
    offset, line = 0, 1
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])  # the start of a character cut by the previous chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[: max(0, e.start - pending)].count(b"\n")
                return f"line {line}, byte {offset + e.start - pending}"
            offset += len(chunk)
            line += chunk.count(b"\n")
    return f"line {line}, byte {offset - len(decoder.getstate()[0])}: a character cut short at the end"


def _jsonl_documents(lines, path: Path, text_field: str) -> Iterator[str]:
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
            yield text


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
    ds = load_hub_dataset(name, config, text_field, streaming)
    if streaming:
        return ds
    docs = [d for d in (clean_document(t or "") for t in ds[text_field]) if d]
    if not docs:
        raise UserError(f"--dataset {name}: {len(ds)} rows, 0 documents with text in {text_field!r}.")
    return docs


def load_hub_dataset(name: str, config: str | None, text_field: str, streaming: bool = False):
    """The train split of a hub dataset (an IterableDataset with `streaming`), checked for `text_field`."""
    ds = hub.load_split(
        name, config, "train", streaming=streaming, hint="Check the name and --dataset-config, or use --train-files."
    )
    if text_field not in (ds.column_names or ()):
        raise UserError(
            f"--dataset {name}: no {text_field!r} column (columns: {ds.column_names}). "
            f"Name the text column with --text-field."
        )
    return ds


def iter_hub_documents(ds, text_field: str, batch_size: int = 1000) -> Iterator[str]:
    """The documents of a loaded hub dataset (streamed or not) in order, read a batch at a time."""
    for batch in ds.iter(batch_size=batch_size):
        for text in batch[text_field]:
            doc = clean_document(text or "")
            if doc:
                yield doc


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
        encoded.extend(_encode(tokenizer, flat[lo : lo + TOKENIZE_BATCH]))
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


def _encode(tokenizer, sentences: list[str]) -> list[tuple[list, list]]:
    """(token ids, word-start flags) of each sentence, without special tokens. `tokenizer` is a
    transformers tokenizer or, in the prepare workers (which do not import transformers), the
    tokenizers.Tokenizer behind a fast one: transformers encodes through it in the same way."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return [(e.ids, _word_starts(e.word_ids)) for e in tokenizer.encode_batch(sentences, add_special_tokens=False)]
    enc = tokenizer(
        sentences, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )
    return [(ids, _word_starts(enc.word_ids(i))) for i, ids in enumerate(enc["input_ids"])]


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

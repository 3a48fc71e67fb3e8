"""What identifies a prepared pretraining corpus: its manifest, its fingerprint, its column types.

A prepared directory holds train/*.arrow and eval/*.arrow (datasets' own Arrow stream format,
memory-mapped when read), tokenizer/ (the tokenizer that made the ids) and manifest.json. The
manifest is written last: a directory without one is not a prepared corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError

FORMAT = "bertscale-pretraining-pairs"
# Bump when the pairs for the same inputs change (reading, pairing rules, sharding, columns):
# every earlier prepared directory and cache entry then counts as made by another version.
VERSION = 1
MANIFEST = "manifest.json"
COLUMNS = ("input_ids", "token_type_ids", "word_start", "next_sentence_label")


def features(vocab_size: int):
    """The datasets.Features of the pair files: token ids fit uint16 for BERT-sized vocabularies."""
    from datasets import Features, List, Value

    ids = Value("uint16") if vocab_size <= 1 << 16 else Value("int32")
    return Features(
        {
            "input_ids": List(ids),
            "token_type_ids": List(Value("int8")),
            "word_start": List(Value("int8")),
            "next_sentence_label": Value("int8"),
        }
    )


def tokenizer_identity(tokenizer, name: str | None = None) -> dict:
    """Name, vocabulary size and a fingerprint of what decides the token ids (vocabulary,
    normalisation such as lower-casing, pre-tokenisation, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        decisive = {key: spec.get(key) for key in ("added_tokens", "normalizer", "pre_tokenizer", "model")}
    else:  # a slow (pure Python) tokenizer
        decisive = {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "lower": getattr(tokenizer, "do_lower_case", None),
        }
    decisive["cls_sep"] = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    return {
        "name": str(name or tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "fingerprint": digest(decisive),
    }


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def files_identity(files: list[Path]) -> dict:
    """Paths, sizes and modification times (not the contents: hashing 20 GB would take minutes)."""
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return {"count": len(files), "bytes": sum(s[1] for s in stats), "digest": digest(stats)}


def fingerprint(tokenizer: dict, settings: dict, source: dict) -> str:
    """Same inputs, settings and tokenizer -> same fingerprint -> the same pairs."""
    return digest(
        {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": tokenizer["fingerprint"],
            "settings": settings,
            "source": source,
        }
    )


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temp file, fsync and rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: Path, flag: str = "--prepared-data") -> dict:
    """The manifest of a finished prepared directory, or a UserError that says what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"{flag} {directory}: no such directory. Make it with `bertscale prepare --task pretrain "
            f"--train-files 'corpus/*.txt' --model M --output-dir {directory}`."
        )
    path = directory / MANIFEST
    if not path.is_file():
        partial = sorted(p.name for p in directory.parent.glob(f".{directory.name}.prepare-*"))
        why = (
            f"a `bertscale prepare` into it was interrupted or is still running ({partial[0]} is its "
            f"unfinished work); run it again"
            if partial
            else "it was not made by `bertscale prepare`"
        )
        raise UserError(f"{flag} {directory}: not a finished prepared corpus (no {MANIFEST}): {why}.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot read it ({e}). Prepare the corpus again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a bertscale prepared-corpus manifest. Prepare the corpus again.")
    if manifest.get("version") != VERSION:
        raise UserError(
            f"{flag} {directory}: prepared by another bertscale version (format {manifest.get('version')}, "
            f"this one reads {VERSION}). Prepare the corpus again."
        )
    return manifest


def check_compatible(
    manifest: dict, tokenizer, max_seq_length: int, directory: Path, flag: str = "--prepared-data"
) -> None:
    """Refuse pairs whose token ids or lengths do not fit this run."""
    made = manifest["tokenizer"]
    ours = tokenizer_identity(tokenizer)
    if made["fingerprint"] != ours["fingerprint"]:
        raise UserError(
            f"{flag} {directory}: prepared with tokenizer {made['name']!r} ({made['class']}, "
            f"{made['vocab_size']} tokens, fingerprint {made['fingerprint']}), but this run's model has "
            f"tokenizer {ours['name']!r} ({ours['class']}, {ours['vocab_size']} tokens, fingerprint "
            f"{ours['fingerprint']}): its token ids would be wrong. Prepare again with --model "
            f"{ours['name']}, or train the model it was prepared for."
        )
    length = manifest["settings"]["max_seq_length"]
    if length != max_seq_length:
        raise UserError(
            f"{flag} {directory}: prepared with --max-seq-length {length}, but this run uses "
            f"{max_seq_length}. Pass --max-seq-length {length}, or prepare again with "
            f"--max-seq-length {max_seq_length}."
        )

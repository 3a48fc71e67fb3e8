"""One shard of a prepared corpus: documents -> held-out split -> NSP pairs -> Arrow files.

This runs in the prepare worker processes. They import pyarrow and tokenizers and nothing heavier
(no torch, transformers or datasets), so a worker starts in a fraction of a second and its memory
is mostly the shard it is working on.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import tokenizers

from .pretraining_data import create_pairs, hold_out, tokenize_documents

WRITE_BATCH_ROWS = 1000  # rows per Arrow record batch, as datasets' ArrowWriter writes them


@dataclass
class Piece:
    """A run of consecutive documents of one unit of the plan, prepared as one shard."""

    kind: str  # "train" (pairs to train on, plus held-out pairs) or "eval" (pairs of --eval-files)
    unit: int
    index: int  # within the unit
    documents: list[str]
    # The first shard of its kind takes the run's own seed and hold-out rule, so that a corpus of
    # one shard gives exactly the pairs of the in-memory path.
    first: bool = False

    @property
    def name(self) -> str:
        return f"{self.unit:05d}-{self.index:04d}"


@dataclass(frozen=True)
class Recipe:
    """Everything a worker needs to turn pieces into shard files (sent to it once, pickled)."""

    tokenizer: tokenizers.Tokenizer
    cls_id: int
    sep_id: int
    max_seq_length: int
    short_seq_prob: float
    seed: int
    validation_split_percentage: float
    hold_out: bool  # False when --eval-files give the evaluation documents
    schema: pa.Schema  # datasets' schema of the pair columns (features + its metadata)
    staging: str


def piece_seed(seed: int, piece: Piece) -> int:
    """The run's seed for the first shard; a seed derived from it and the shard's place otherwise."""
    if piece.first:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{piece.kind}/{piece.name}".encode()).digest()[:8], "little")


def split_held_out(piece: Piece, recipe: Recipe, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents of a piece. The first shard holds out as the in-memory path does
    (at least one document); the others hold out `percentage` percent on average, rounding at random,
    so that many small shards do not hold out a document each."""
    docs = piece.documents
    if piece.kind == "eval":
        return [], docs
    if not recipe.hold_out or recipe.validation_split_percentage <= 0:
        return docs, []
    if piece.first:
        return hold_out(docs, recipe.validation_split_percentage, seed)
    rng = random.Random(seed)
    expected = len(docs) * recipe.validation_split_percentage / 100
    held = set(rng.sample(range(len(docs)), int(expected) + (rng.random() < expected % 1)))
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def build_columns(documents: list[str], recipe: Recipe, seed: int) -> dict[str, list]:
    """build_pairs with the worker's tokenizers.Tokenizer: the same pairs for the same seed."""
    tokenized = tokenize_documents(documents, recipe.tokenizer, max_piece=max(1, (recipe.max_seq_length - 3) // 2))
    return create_pairs(
        tokenized, recipe.max_seq_length, recipe.short_seq_prob, random.Random(seed), recipe.cls_id, recipe.sep_id
    )


def write_pairs(columns: dict[str, list], schema: pa.Schema, path: Path) -> dict:
    """Write pair columns as an Arrow stream file (what datasets' ArrowWriter writes), atomically."""
    table = pa.Table.from_pydict(
        {name: pa.array(columns[name], type=schema.field(name).type) for name in schema.names}, schema=schema
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in table.to_batches(max_chunksize=WRITE_BATCH_ROWS):
            writer.write_batch(batch)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before the manifest can name it
    os.replace(tmp, path)
    lengths = [len(ids) for ids in columns["input_ids"]]
    return {
        "path": f"{path.parent.name}/{path.name}",
        "rows": len(lengths),
        "tokens": sum(lengths),
        "random_next": sum(columns["next_sentence_label"]),
        "bytes": path.stat().st_size,
    }


_RECIPE: Recipe | None = None


def init_worker(recipe: Recipe, in_pool: bool = True) -> None:
    """Keep the recipe (a pool initializer, or called once when preparing in-process)."""
    global _RECIPE
    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    recipe.tokenizer.no_truncation()
    recipe.tokenizer.no_padding()
    _RECIPE = recipe


def prepare_piece(piece: Piece) -> dict:
    """Write one shard (train/NAME.arrow, eval/NAME.arrow when it has pairs) and describe it."""
    recipe = _RECIPE
    started = time.perf_counter()
    seed = piece_seed(recipe.seed, piece)
    train_docs, held_docs = split_held_out(piece, recipe, seed)
    meta = {
        "name": piece.name,
        "kind": piece.kind,
        "unit": piece.unit,
        "index": piece.index,
        "documents": len(piece.documents),
        "held_out_documents": len(held_docs) if piece.kind == "train" else 0,
        "characters": sum(map(len, piece.documents)),
        "train": None,
        "eval": None,
    }
    for split, docs, split_seed in (("train", train_docs, seed), ("eval", held_docs, seed + 1)):
        if not docs:
            continue
        columns = build_columns(docs, recipe, split_seed)
        if columns["input_ids"]:
            meta[split] = write_pairs(columns, recipe.schema, Path(recipe.staging) / split / f"{piece.name}.arrow")
        del columns
    meta["seconds"] = round(time.perf_counter() - started, 3)
    return meta

"""Training from a prepared corpus: memory-map its shards, check they fit the run, fix eval masks,
and the fingerprint-keyed cache that `pretrain --train-files` prepares into once and then reuses.

Every rank memory-maps the same Arrow files: the pages are the operating system's page cache,
shared by all ranks on a node, and nothing is tokenised at training time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..args import flag_name
from ..errors import UserError
from . import pretraining_manifest as mf
from .pretraining_prepare import part_marker, plan_job, prepare

CACHE_ENV = "BERTSCALE_PREPARED_CACHE"  # what --prepared-cache reads too; default ~/.cache/bertscale
WAIT_LOG_EVERY_S = 300.0  # a rank waiting for the others' parts says so this often
# Flags that decide the pairs: with --prepared-data they were decided when it was prepared.
PAIR_FLAGS = ("short_seq_prob", "document_separator", "text_field", "validation_split_percentage")
OTHER_TEXT_FLAGS = ("train_files", "dataset", "dataset_config", "streaming")


@dataclass
class PreparedCorpus:
    directory: Path
    manifest: dict
    train: object  # datasets.Dataset of training pairs, memory-mapped
    eval: object | None  # datasets.Dataset of evaluation pairs (unmasked), shards interleaved; None if none
    flag: str = "--prepared-data"  # how the run named it: --prepared-data, or --prepared-cache for --train-files

    @property
    def summary(self) -> str:
        """For messages: '--train-files ...: N files, M documents with text', as the files were named."""
        t, files = self.manifest["totals"], self.manifest["source"].get("train_files")
        if self.flag == "--prepared-data" or not files:
            head = f"{self.flag} {self.directory}: {t['shards']} shard{'s' * (t['shards'] != 1)}"
        else:
            patterns = " ".join(repr(p) for p in files["patterns"])
            head = f"--train-files {patterns}: {files['count']} file{'s' * (files['count'] != 1)}"
        return f"{head}, {t['documents']} document{'s' * (t['documents'] != 1)} with text"


def load_prepared(directory, tokenizer, max_seq_length: int, flag: str = "--prepared-data") -> PreparedCorpus:
    """Memory-map a prepared corpus after checking it is whole and made for this tokenizer and length."""
    directory = Path(directory).expanduser().absolute()
    manifest = mf.read_manifest(directory, flag)
    mf.check_compatible(manifest, tokenizer, max_seq_length, directory, flag)
    splits = {"train": [], "eval": []}
    for shard in manifest["shards"]:
        for split, files in splits.items():
            if shard[split]:
                files.append(_checked_file(directory, shard[split], flag))
    if not splits["train"]:
        raise UserError(f"{flag} {directory}: no training pairs. Prepare it again from a corpus with text.")
    train = _memory_mapped(splits["train"])
    eval_pairs = None
    if splits["eval"]:
        eval_pairs = _memory_mapped(splits["eval"])
        if len(splits["eval"]) > 1:
            eval_pairs = eval_pairs.select(
                interleaved_order([s["eval"]["rows"] for s in manifest["shards"] if s["eval"]])
            )
    return PreparedCorpus(directory, manifest, train, eval_pairs, flag)


def check_flags(directory, args, data) -> dict:
    """The manifest of --prepared-data, after refusing the flags it makes meaningless (`args`: the
    pretraining flags, `data`: the data flags): another source of text, other evaluation files, or
    other pair settings than it was prepared with. A flag left at its default is not refused."""
    directory = Path(directory).expanduser().absolute()
    where, given = f"--prepared-data {directory}", _given(args) | _given(data)
    other = [flag_name(f) for f in OTHER_TEXT_FLAGS if f in given]
    if other:
        raise UserError(
            f"{where} is this run's training text; {' and '.join(other)} would be another. Leave "
            f"{'them' if len(other) > 1 else 'it'} out, or leave out --prepared-data to train from "
            f"{'them' if len(other) > 1 else 'it'}."
        )
    manifest = mf.read_manifest(directory)
    if "eval_files" in given:
        made_from = "its --eval-files" if "eval_files" in manifest["source"] else "documents held out of its text"
        raise UserError(
            f"{where} holds its own {manifest['totals']['eval_rows']} evaluation pairs (from {made_from}); "
            f"--eval-files cannot replace them. Prepare the corpus with these --eval-files, or leave the flag out."
        )
    made = manifest["settings"]
    differ = [f for f in PAIR_FLAGS if f in given and getattr(args, f) != made[f]]
    if differ:
        raise UserError(
            f"{where} was prepared with {', '.join(f'{flag_name(f)} {made[f]}' for f in differ)}; this run's "
            f"{', '.join(f'{flag_name(f)} {getattr(args, f)}' for f in differ)} cannot change its pairs. "
            f"Leave the flag out, or prepare the corpus again with it."
        )
    return manifest


def _given(flags) -> set[str]:
    """Names of the fields of a flags dataclass whose values differ from their defaults."""
    return {
        f.name
        for f in dataclasses.fields(flags)
        if getattr(flags, f.name) != (f.default if f.default is not dataclasses.MISSING else f.default_factory())
    }


def _memory_mapped(files: list[Path]):
    """One datasets.Dataset over memory-mapped shard files. The same as concatenate_datasets of
    Dataset.from_file, without its per-file bookkeeping (10x faster for thousands of shards)."""
    from datasets import Dataset
    from datasets.table import MemoryMappedTable, concat_tables

    return Dataset(concat_tables([MemoryMappedTable.from_file(str(f)) for f in files]))


def _checked_file(directory: Path, shard_file: dict, flag: str) -> Path:
    path = directory / shard_file["path"]
    size = path.stat().st_size if path.is_file() else None
    if size != shard_file["bytes"]:
        found = "is missing" if size is None else f"has {size} bytes, not {shard_file['bytes']}"
        raise UserError(
            f"{flag} {directory}: shard {shard_file['path']} {found}: the directory is damaged. Prepare it again."
        )
    return path


def interleaved_order(lengths: list[int]) -> np.ndarray:
    """Row order that takes the first row of every shard, then the second, ...: the first N
    evaluation pairs (--max-eval-samples) then come from the whole corpus, not its first shard."""
    offsets = np.cumsum([0, *lengths[:-1]])
    rows = np.concatenate([np.arange(n) for n in lengths])
    shard = np.repeat(np.arange(len(lengths)), lengths)
    return (offsets[shard] + rows)[np.lexsort((shard, rows))]


def masked_eval_features(eval_pairs, collator, seed: int, max_eval_samples: int | None = None):
    """The evaluation rows with masks fixed once from `seed` (collator.fixed_masks), as the
    in-memory path builds them: a datasets.Dataset with labels, or None without pairs."""
    from datasets import Dataset

    if eval_pairs is None or not len(eval_pairs):
        return None
    n = min(max_eval_samples, len(eval_pairs)) if max_eval_samples else len(eval_pairs)
    pairs = eval_pairs.select(range(n))[:]
    if not pairs["input_ids"]:
        return None
    word_start = pairs.pop("word_start")
    pairs["input_ids"], pairs["labels"] = collator.fixed_masks(pairs["input_ids"], word_start, seed)
    return Dataset.from_dict(pairs)


# --- the cache of `pretrain --train-files` ------------------------------------------------------
def prepared_cache_dir(fingerprint: str, cache_root=None) -> Path:
    """Where the corpus with this fingerprint is cached: CACHE_ROOT/pretraining/FINGERPRINT. The
    root (--prepared-cache or $BERTSCALE_PREPARED_CACHE, else ~/.cache/bertscale) must be one that
    every node sees."""
    root = Path(cache_root or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bertscale").expanduser()
    return root.absolute() / "pretraining" / fingerprint


def prepare_or_reuse(
    tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    split_across_ranks: bool = True,
    cache_root=None,
    workers: int | None = None,
    poll_s: float = 2.0,
    log=print,
    **corpus,
) -> Path:
    """The cached prepared directory for `corpus` (prepare's keyword arguments), made on first use.

    Call it on every rank. With split_across_ranks, each rank prepares a disjoint part of the files
    (with `workers` processes of its own) and rank 0 publishes when all parts are done; otherwise
    rank 0 prepares it all. Every rank returns once the corpus is published. The other ranks wait
    by watching files, not in a collective, so no timeout runs out however long preparing takes,
    and a rank that fails prints its error and leaves a note that stops the others.
    """
    try:
        job = plan_job(Path(cache_root or "."), tokenizer, log=log, **corpus)  # resolves inputs, fingerprints them
    except UserError as e:
        raise UserError(str(e), echo=rank == 0) from None  # every rank meets it: rank 0 says it
    directory = prepared_cache_dir(job.fingerprint, cache_root)
    if (directory / mf.MANIFEST).is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    job.output = directory
    parts = world_size if split_across_ranks else 1
    since = time.time()
    failed = job.staging / "parts" / f"failed-{rank:04d}"
    failed.unlink(missing_ok=True)
    published = (directory / mf.MANIFEST).is_file
    try:
        if parts == 1 and rank == 0:
            prepare(directory, job.tokenizer, workers=workers, log=log, **corpus)
        elif parts > 1:
            prepare(directory, job.tokenizer, workers=workers, part=rank, parts=parts, log=log, **corpus)
            if rank == 0:
                markers = [part_marker(job.staging, p, parts) for p in range(parts)]
                missing = lambda: [] if published() else [f"part {p}" for p, m in enumerate(markers) if not m.exists()]
                _wait(missing, job, since, poll_s, log)
                prepare(directory, job.tokenizer, parts=parts, finalize=True, log=log, **corpus)
    except BaseException as e:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(str(e) or type(e).__name__)
        raise
    _wait(lambda: [] if published() else [mf.MANIFEST], job, since, poll_s, log)
    return directory


def _wait(missing, job, since: float, poll_s: float, log) -> None:
    """Poll until missing() is empty; stop with an error when another rank reports a failure of this
    attempt. A long wait is logged now and then, with what it waits for: ranks on other nodes that
    cannot see this directory would otherwise leave it waiting without a word."""
    last_log = time.monotonic()
    while waiting := missing():
        failures = [f for f in (job.staging / "parts").glob("failed-*") if f.stat().st_mtime >= since - 1]
        if failures:
            # echo=False: the rank that failed printed its error
            raise UserError(f"preparing {job.summary} failed on another rank: {failures[0].read_text()}", echo=False)
        if time.monotonic() - last_log >= WAIT_LOG_EVERY_S:
            last_log = time.monotonic()
            log(
                f"[bertscale] still waiting for {', '.join(waiting)} of {job.output} (written by the other ranks; "
                f"with several nodes the cache must be a directory all of them see: --prepared-cache)"
            )
        time.sleep(poll_s)

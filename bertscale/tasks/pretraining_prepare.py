"""`bertscale prepare --task pretrain`: a text corpus -> NSP pairs in sharded Arrow files, once.

The corpus streams through: this process reads documents file by file and cuts them into pieces of
about `shard_size_mb` MB of text; worker processes turn each piece into pairs and write its shard
files. At most workers + 1 pieces are in flight, so memory does not grow with the corpus.

Where shards end depends only on the files (a plan made from their sizes), never on the number of
workers or machines: the same inputs give the same shards whether one process prepares them, a pool,
or several Slurm array tasks (`part`/`parts`, each a disjoint set of files, then `finalize`).

Everything is written into a hidden staging directory next to the output and published by one
rename after the manifest is written, so an interrupted prepare leaves nothing a run would trust.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UserError
from . import pretraining_manifest as mf
from .pretraining_data import SEPARATORS, expand_globs, iter_file_documents, iter_hub_documents, load_hub_dataset
from .pretraining_shards import Piece, Recipe, init_worker, prepare_piece

PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class Unit:
    """Consecutive files (together at most one shard's worth, or one bigger file) read in order."""

    index: int
    kind: str  # "train" or "eval"
    files: tuple[Path, ...]  # empty: the hub dataset
    bytes: int
    first: bool  # the first unit of its kind


@dataclass
class Job:
    """A resolved prepare request: what to read, how, where, and its fingerprint."""

    output: Path
    tokenizer: object  # the transformers tokenizer
    tokenizer_info: dict
    settings: dict
    source: dict
    units: list[Unit]
    fingerprint: str
    summary: str  # "--train-files 'x': 3 files, 12.0 MB" for messages
    hub: object = None  # the loaded hub dataset, when the corpus is one
    text_field: str = "text"
    eval_files: bool = False
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)

    @property
    def staging(self) -> Path:
        return self.output.parent / f".{self.output.name}.prepare-{self.fingerprint[:12]}"


# --- the entry point ---------------------------------------------------------------------------
def prepare(
    output_dir,
    tokenizer,
    *,
    train_files=(),
    eval_files=(),
    dataset: str | None = None,
    dataset_config: str | None = None,
    streaming: bool = False,
    max_seq_length: int = 128,
    short_seq_prob: float = 0.1,
    seed: int = 42,
    document_separator: str = "blank-line",
    text_field: str = "text",
    validation_split_percentage: float = 5.0,
    shard_size_mb: float = 4.0,
    workers: int | None = None,
    part: int | None = None,
    parts: int = 1,
    finalize: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Prepare a corpus into `output_dir`; returns its manifest (None for one part of several).

    `tokenizer` is a model name (as for --model) or a loaded transformers tokenizer. `workers`
    processes (default: all cores) build the pairs; 1 builds them in this process. With `parts` > 1,
    `part` prepares only its share of the files into the staging directory, and a later call with
    `finalize=True` (the same arguments otherwise) checks that every part is done and publishes.
    Workers are spawned processes: a script that calls this guards its top level with
    `if __name__ == "__main__":`, as multiprocessing asks.
    """
    job = plan_job(
        output_dir,
        tokenizer,
        train_files=train_files,
        eval_files=eval_files,
        dataset=dataset,
        dataset_config=dataset_config,
        streaming=streaming,
        max_seq_length=max_seq_length,
        short_seq_prob=short_seq_prob,
        seed=seed,
        document_separator=document_separator,
        text_field=text_field,
        validation_split_percentage=validation_split_percentage,
        shard_size_mb=shard_size_mb,
        log=log,
    )
    done = _already_published(job, overwrite)
    if done is not None:
        if part is None:
            log(f"[bertscale] {job.output}: already prepared from these inputs (fingerprint {job.fingerprint})")
        return None if part is not None else done
    workers = max(1, workers or os.cpu_count() or 1)
    if parts < 1 or (part is not None and not 0 <= part < parts):
        raise UserError(f"--part {part} --parts {parts}: the part is a number from 0 to parts - 1.")
    if finalize:
        return _finalize_parts(job, parts, overwrite)
    if part is not None and parts > 1:
        _prepare_part(job, part, parts, workers)
        return None
    return _prepare_all(job, workers, overwrite)


def plan_job(
    output_dir,
    tokenizer,
    *,
    train_files=(),
    eval_files=(),
    dataset=None,
    dataset_config=None,
    streaming=False,
    max_seq_length=128,
    short_seq_prob=0.1,
    seed=42,
    document_separator="blank-line",
    text_field="text",
    validation_split_percentage=5.0,
    shard_size_mb=4.0,
    log=print,
) -> Job:
    """Resolve the inputs (globs, tokenizer, hub dataset), plan the units and fingerprint it all."""
    check_settings(train_files, dataset, max_seq_length, document_separator, validation_split_percentage, shard_size_mb)
    name = tokenizer if isinstance(tokenizer, str) else None
    if name is not None:
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(name)
    settings = {
        "max_seq_length": max_seq_length,
        "short_seq_prob": short_seq_prob,
        "seed": seed,
        "document_separator": document_separator,
        "text_field": text_field,
        "validation_split_percentage": 0.0 if eval_files else validation_split_percentage,
        "shard_size_mb": shard_size_mb,
    }
    shard_bytes = int(shard_size_mb * 2**20)
    hub, source, units = None, {}, []
    if train_files:
        train = expand_globs(train_files, "--train-files")
        units = plan_units(train, "train", shard_bytes, start=0)
        source["train_files"] = {"patterns": list(train_files), **mf.files_identity(train)}
        summary = f"--train-files {' '.join(repr(p) for p in train_files)}: {_files_text(train)}"
    else:
        hub = load_hub_dataset(dataset, dataset_config, text_field, streaming)
        units = [Unit(0, "train", (), 0, True)]
        # A downloaded dataset has a content fingerprint; a stream is known by its name only.
        source["dataset"] = {
            "name": dataset,
            "config": dataset_config,
            "streaming": streaming,
            "fingerprint": None if streaming else getattr(hub, "_fingerprint", None),
        }
        summary = f"--dataset {dataset}" + (" (streamed)" if streaming else "")
    if eval_files:
        held = expand_globs(eval_files, "--eval-files")
        units += plan_units(held, "eval", shard_bytes, start=len(units))
        source["eval_files"] = {"patterns": list(eval_files), **mf.files_identity(held)}
    info = mf.tokenizer_identity(tokenizer, name)
    return Job(
        output=Path(output_dir).expanduser().absolute(),
        tokenizer=tokenizer,
        tokenizer_info=info,
        settings=settings,
        source=source,
        units=units,
        fingerprint=mf.fingerprint(info, settings, source),
        summary=summary,
        hub=hub,
        text_field=text_field,
        eval_files=bool(eval_files),
        log=log,
    )


def check_settings(train_files, dataset, max_seq_length, separator, held_out_percentage, shard_size_mb) -> None:
    """Refuse settings that cannot make a corpus, before anything is read."""
    if train_files and dataset:
        raise UserError("--train-files and --dataset: give one source of text, not both.")
    if not train_files and not dataset:
        raise UserError("pretraining needs text: pass --train-files 'corpus/*.txt' or --dataset NAME.")
    if separator not in SEPARATORS:
        raise UserError(f"--document-separator {separator!r}: use one of {', '.join(SEPARATORS)}.")
    if max_seq_length < 8:
        raise UserError(f"--max-seq-length {max_seq_length}: too short for a sentence pair; use at least 8.")
    if not 0 <= held_out_percentage < 100:
        raise UserError(f"--validation-split-percentage {held_out_percentage}: use 0 (none) up to below 100.")
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb {shard_size_mb}: must be positive (MB of text per shard).")


def _files_text(files: list[Path]) -> str:
    size = sum(p.stat().st_size for p in files)
    return f"{len(files)} file{'s' * (len(files) != 1)}, {size / 2**20:.1f} MB"


# --- the plan ----------------------------------------------------------------------------------
def plan_units(files: list[Path], kind: str, shard_bytes: int, start: int) -> list[Unit]:
    """Consecutive files packed into units of at most `shard_bytes`; a bigger file is a unit alone
    (and is cut into several shards as it is read)."""
    units, group, size = [], [], 0
    for path in files:
        n = path.stat().st_size
        if group and size + n > shard_bytes:
            units.append(Unit(start + len(units), kind, tuple(group), size, not units))
            group, size = [], 0
        group.append(path)
        size += n
    if group:
        units.append(Unit(start + len(units), kind, tuple(group), size, not units))
    return units


def assign_parts(units: list[Unit], parts: int) -> list[list[Unit]]:
    """Units dealt to `parts` parts, biggest first to the least loaded part (deterministic)."""
    loads = [[0, p, []] for p in range(parts)]
    for unit in sorted(units, key=lambda u: (-u.bytes, u.index)):
        target = min(loads, key=lambda load: (load[0], load[1]))
        target[0] += max(unit.bytes, 1)
        target[2].append(unit)
    return [sorted(load[2], key=lambda u: u.index) for load in loads]


def unit_pieces(job: Job, unit: Unit) -> Iterator[Piece]:
    """The unit's documents, read in order and cut into pieces of about one shard of text. A unit
    of known size is cut into equal pieces, so that none is a small remainder."""
    shard_chars = job.settings["shard_size_mb"] * 2**20
    target = unit.bytes / math.ceil(unit.bytes / shard_chars) if unit.bytes else shard_chars
    if unit.files:
        sep, field_name = job.settings["document_separator"], job.settings["text_field"]
        documents = (doc for path in unit.files for doc in iter_file_documents(path, sep, field_name))
    else:
        documents = iter_hub_documents(job.hub, job.text_field)
    piece, chars, index = [], 0, 0
    for doc in documents:
        piece.append(doc)
        chars += len(doc)
        if chars >= target:
            yield Piece(unit.kind, unit.index, index, piece, first=unit.first and index == 0)
            piece, chars, index = [], 0, index + 1
    if piece:
        yield Piece(unit.kind, unit.index, index, piece, first=unit.first and index == 0)


# --- running pieces ----------------------------------------------------------------------------
def _recipe(job: Job, staging: Path) -> Recipe:
    import tokenizers

    backend = getattr(job.tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            f"--model {job.tokenizer_info['name']}: its tokenizer has no fast (Rust) version, which "
            f"prepare needs. Use a model with a tokenizer.json, or train from --train-files without "
            f"preparing."
        )
    s = job.settings
    return Recipe(
        tokenizer=tokenizers.Tokenizer.from_str(backend.to_str()),
        cls_id=job.tokenizer.cls_token_id,
        sep_id=job.tokenizer.sep_token_id,
        max_seq_length=s["max_seq_length"],
        short_seq_prob=s["short_seq_prob"],
        seed=s["seed"],
        validation_split_percentage=s["validation_split_percentage"],
        hold_out=not job.eval_files,
        schema=mf.features(len(job.tokenizer)).arrow_schema,
        staging=str(staging),
    )


def run_pieces(job: Job, units: list[Unit], staging: Path, workers: int) -> list[dict]:
    """Prepare every piece of `units` into `staging`; returns the shard descriptions in order."""
    for split in ("train", "eval"):
        (staging / split).mkdir(parents=True, exist_ok=True)
    recipe = _recipe(job, staging)
    pieces = (piece for unit in units for piece in unit_pieces(job, unit))
    shard_chars = job.settings["shard_size_mb"] * 2**20
    expected = sum(math.ceil(u.bytes / shard_chars) if u.bytes else workers for u in units)
    workers = max(1, min(workers, expected))  # a pool takes a second to start: none for one shard
    progress = _Progress(job)
    if workers == 1:
        init_worker(recipe, in_pool=False)
        metas = [progress.add(prepare_piece(piece)) for piece in pieces]
    else:
        metas = _run_in_pool(pieces, recipe, workers, progress)
    return sorted(metas, key=lambda m: (m["unit"], m["index"]))


def _run_in_pool(pieces: Iterator[Piece], recipe: Recipe, workers: int, progress: _Progress) -> list[dict]:
    # spawn: safe after torch/CUDA or a process group is set up (pretrain prepares inside a rank),
    # and cheap here because the workers import only pyarrow and tokenizers.
    context = multiprocessing.get_context("spawn")
    metas, pending = [], set()
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker, initargs=(recipe,)) as pool:
            try:
                for piece in pieces:
                    if len(pending) > workers:  # keep workers + 1 pieces in flight, not the corpus
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        metas += [progress.add(f.result()) for f in done]
                    pending.add(pool.submit(prepare_piece, piece))
                metas += [progress.add(f.result()) for f in wait(pending).done]
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool:
        raise UserError(
            f"a prepare worker process died (out of memory?). Use fewer --preprocessing-workers "
            f"(now {workers}) or a smaller --shard-size-mb."
        ) from None
    return metas


class _Progress:
    def __init__(self, job: Job):
        self.job, self.shards, self.chars, self.last = job, 0, 0, time.perf_counter()

    def add(self, meta: dict) -> dict:
        self.shards += 1
        self.chars += meta["characters"]
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            seconds = now - self.job.started
            self.job.log(
                f"[bertscale] prepare: {self.shards} shards, {self.chars / 2**20:.0f} MB of text in "
                f"{seconds:.0f} s ({self.chars / 2**20 / seconds:.1f} MB/s)"
            )
        return meta


# --- one machine, parts, finalize --------------------------------------------------------------
def _already_published(job: Job, overwrite: bool) -> dict | None:
    """The manifest when the output holds these very pairs; refuses an output that holds others."""
    out = job.output
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--output-dir {out}: is a file. Choose a directory.")
    if not (out / mf.MANIFEST).exists():
        if any(out.iterdir()):
            raise UserError(
                f"--output-dir {out}: exists and is not a prepared corpus (no {mf.MANIFEST}). "
                f"Choose a new or empty directory."
            )
        return None
    manifest = mf.read_manifest(out, "--output-dir")
    if manifest.get("fingerprint") == job.fingerprint:
        return manifest
    if overwrite:
        return None
    raise UserError(
        f"--output-dir {out}: holds a corpus prepared from other inputs or settings (fingerprint "
        f"{manifest.get('fingerprint')}, this one {job.fingerprint}). Choose another --output-dir, "
        f"or pass --overwrite to replace it."
    )


def _prepare_all(job: Job, workers: int, overwrite: bool) -> dict:
    staging = job.staging
    shutil.rmtree(staging, ignore_errors=True)  # the leftovers of an interrupted run are not trusted
    staging.mkdir(parents=True)
    try:
        metas = run_pieces(job, job.units, staging, workers)
        return _publish(job, staging, metas, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def part_marker(staging: Path, part: int, parts: int) -> Path:
    """The file that says part `part` of `parts` is done (written last, with its shards listed)."""
    return staging / "parts" / f"{part:04d}-of-{parts:04d}.json"


def _prepare_part(job: Job, part: int, parts: int, workers: int) -> None:
    """Prepare this part's units into the shared staging directory; a marker file says it is done."""
    marker = part_marker(job.staging, part, parts)
    if marker.exists():
        job.log(f"[bertscale] prepare part {part} of {parts}: already done ({marker})")
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    units = assign_parts(job.units, parts)[part]
    job.log(
        f"[bertscale] prepare part {part} of {parts}: {len(units)} of {len(job.units)} units, "
        f"{sum(len(u.files) for u in units)} files, {workers} workers"
    )
    metas = run_pieces(job, units, job.staging, workers)
    mf.write_json_atomic(
        marker,
        {
            "fingerprint": job.fingerprint,
            "part": part,
            "parts": parts,
            "units": [u.index for u in units],
            "shards": metas,
        },
    )
    job.log(f"[bertscale] prepare part {part} of {parts}: done, {len(metas)} shards")


def _finalize_parts(job: Job, parts: int, overwrite: bool) -> dict:
    import json

    markers = [part_marker(job.staging, p, parts) for p in range(parts)]
    missing = [p for p, m in enumerate(markers) if not m.exists()]
    if missing:
        raise UserError(
            f"prepare --finalize: part(s) {', '.join(map(str, missing))} of {parts} are not done "
            f"(no {markers[missing[0]]}). Run them (or the array job again), then finalize."
        )
    metas, units = [], []
    for m in markers:
        done = json.loads(m.read_text())
        if done["fingerprint"] != job.fingerprint:
            raise UserError(f"{m}: made for other inputs or settings. Run all parts again with the same arguments.")
        metas += done["shards"]
        units += done["units"]
    if sorted(units) != [u.index for u in job.units]:
        raise UserError(
            f"prepare --finalize: the {parts} parts do not cover the corpus's {len(job.units)} units "
            f"exactly. Run all parts again with the same --parts."
        )
    keep = {meta[split]["path"] for meta in metas for split in ("train", "eval") if meta[split]}
    for path in list(job.staging.glob("train/*")) + list(job.staging.glob("eval/*")):
        if f"{path.parent.name}/{path.name}" not in keep:
            path.unlink()  # a shard file of an earlier, unfinished attempt
    shutil.rmtree(job.staging / "parts")
    return _publish(job, job.staging, sorted(metas, key=lambda m: (m["unit"], m["index"])), overwrite)


def _publish(job: Job, staging: Path, metas: list[dict], overwrite: bool) -> dict:
    """Write the tokenizer and the manifest into the staging directory, then rename it into place."""
    manifest = _manifest(job, metas)
    if not manifest["totals"]["train_rows"]:
        raise UserError(
            f"{job.summary}: {manifest['totals']['documents']} documents with text, 0 training pairs. "
            f"Give files with text (documents are split by --document-separator "
            f"{job.settings['document_separator']})."
        )
    job.tokenizer.save_pretrained(staging / "tokenizer")
    mf.write_json_atomic(staging / mf.MANIFEST, manifest)
    out = job.output
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    if out.exists():
        if any(out.iterdir()) and not overwrite:  # another prepare published first
            done = _already_published(job, overwrite=False)
            shutil.rmtree(staging)
            return done
        os.rename(out, old)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
    t = manifest["totals"]
    job.log(
        f"[bertscale] prepared {out}: {t['documents']} documents ({t['held_out_documents']} held out), "
        f"{t['train_rows']} training pairs, {t['eval_rows']} evaluation pairs, {len(metas)} shards, "
        f"{t['bytes_on_disk'] / 2**20:.1f} MB, in {manifest['seconds']:.1f} s"
    )
    return manifest


def _manifest(job: Job, metas: list[dict]) -> dict:
    def total(split, key):
        return sum(m[split][key] for m in metas if m[split])

    seconds = time.perf_counter() - job.started
    totals = {
        "shards": len(metas),
        "documents": sum(m["documents"] for m in metas),
        "held_out_documents": sum(m["held_out_documents"] for m in metas),
        "characters": sum(m["characters"] for m in metas),
        "train_rows": total("train", "rows"),
        "eval_rows": total("eval", "rows"),
        "train_tokens": total("train", "tokens"),
        "eval_tokens": total("eval", "tokens"),
        "random_next_share": round(total("train", "random_next") / max(1, total("train", "rows")), 4),
        "bytes_on_disk": total("train", "bytes") + total("eval", "bytes"),
    }
    return {
        "format": mf.FORMAT,
        "version": mf.VERSION,
        "fingerprint": job.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "tokenizer": job.tokenizer_info,
        "settings": job.settings,
        "source": job.source,
        "features": mf.features(len(job.tokenizer)).to_dict(),
        "totals": totals,
        "shards": metas,
    }

"""Resume policy: which checkpoint a run continues from, and whether it may.

Decided before anything is built or written, so a refused resume leaves the output dir as it was.
Another model or task is refused; another number of ranks, ZeRO stage or precision is not: the
trainer resumes those through a universal checkpoint (universal.py), or directly where only the rank
count changed under ZeRO stage 0 (`loads_directly`), and `changes` says in words what differs.
"""

from __future__ import annotations

from pathlib import Path

from .. import distributed as dist
from ..errors import UserError
from .save import STATE_FILE, latest, read_state


def plan_resume(args, model: str, task_name: str) -> Path | None:
    """The checkpoint this run continues from (`args`: the checkpointing flags), after checking that it
    may: call it before anything is built or written. Rank 0 decides (one view of the file system),
    every rank gets the answer."""
    verdict = None
    if dist.is_main():
        try:
            verdict = ("resume", _plan_resume(args, model, task_name))
        except UserError as e:
            verdict = ("error", str(e))
    kind, value = dist.broadcast_object(verdict)
    if kind == "error":
        raise UserError(value, echo=dist.is_main())
    return value


def _plan_resume(args, model: str, task_name: str) -> Path | None:
    out = Path(args.output_dir)
    explicit = args.resume not in ("auto", "none")
    if args.overwrite_output_dir:
        if explicit and _inside(Path(args.resume), out):
            raise UserError(
                f"--resume {args.resume} lies in {out}, which --overwrite-output-dir clears first; "
                "resume without --overwrite-output-dir, or into another --output-dir"
            )
        ckpt = _explicit_checkpoint(args.resume) if explicit else None  # starting over: auto finds nothing
    else:
        newest = latest(out)
        ckpt = _explicit_checkpoint(args.resume) if explicit else newest if args.resume == "auto" else None
        if newest is not None and (ckpt is None or ckpt.resolve() != newest.resolve()):
            # Another timeline's steps would be mixed with the checkpoints already there.
            why = "--resume none starts a new run" if ckpt is None else f"--resume {args.resume} is not its newest"
            raise UserError(
                f"{out} holds checkpoints up to {newest.name} and {why}: continue with --resume "
                "auto, or use another --output-dir (--resume PATH works from there), or "
                "--overwrite-output-dir to start over"
            )
    if ckpt is None:
        return None
    state = read_state(ckpt)
    for key, now in (("model", model), ("task", task_name)):
        if key in state and state[key] != now:
            where = (
                f"{out} holds checkpoints of another run"
                if _inside(ckpt, out)
                else f"--resume {args.resume} is a checkpoint of another run"
            )
            raise UserError(
                f"{where} ({key} {state[key]!r}, this run {now!r}); use another --output-dir, or "
                "--overwrite-output-dir to start over"
            )
    return ckpt  # another rank count, ZeRO stage or precision: the trainer resumes through a universal checkpoint


def _explicit_checkpoint(path_arg: str) -> Path:
    """--resume PATH: a step-N dir, OUTPUT/checkpoints, or an output dir (its newest checkpoint)."""
    path = Path(path_arg)
    if (path / STATE_FILE).is_file():
        return path
    found = latest(path.parent) if path.name == "checkpoints" else latest(path)
    if found is None:
        raise UserError(
            f"--resume {path_arg}: no complete checkpoint there (expected a step-N folder with {STATE_FILE})"
        )
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


SETUP_WORDS = {
    "world_size": lambda v: f"{v} rank{'s' * (v != 1)}",
    "zero_stage": lambda v: f"ZeRO stage {v}",
    "precision": str,
}


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between the setup a checkpoint was written with and this run's, in words
    ("2 ranks -> 1 rank"); empty when a plain resume loads it exactly."""
    return [
        f"{words(saved[k])} -> {words(now[k])}"
        for k, words in SETUP_WORDS.items()
        if k in saved and k in now and saved[k] != now[k]
    ]


def loads_directly(saved: dict, now: dict) -> bool:
    """Whether load.py takes the checkpoint as it is: the same setup, or only another number of ranks
    where both runs use ZeRO stage 0 in fp32 (no partitions: each rank holds, and the checkpoint keeps,
    the whole model and optimizer states; DeepSpeed's bf16 stage-0 optimizer partitions its fp32 copy
    across ranks). Any other change goes through a universal checkpoint."""
    return not _blocking_changes(saved, now)


def _blocking_changes(saved: dict, now: dict) -> list[str]:
    whole = all(setup.get("zero_stage") == 0 and setup.get("precision") == "fp32" for setup in (saved, now))
    changed = [k for k in SETUP_WORDS if k in saved and k in now and saved[k] != now[k]]
    return [k for k in changed if not (k == "world_size" and whole)]


def check_same_setup(ckpt: Path, state: dict, now: dict) -> None:
    """ZeRO checkpoints hold per-rank partitions in one stage's layout and precision: the exact load
    refuses another setup (which DeepSpeed would fail on with a traceback, or load inexactly); the
    trainer sends those through universal.py instead."""
    for key in _blocking_changes(state, now):
        words = SETUP_WORDS[key]
        raise UserError(
            f"{ckpt} was written with {words(state[key])} and this run has {words(now[key])}: a resume needs "
            "the same number of ranks, ZeRO stage and precision. Or continue from its weights (optimizer "
            f"state reset): bertscale export --checkpoint {ckpt} --output W, then train with --model W in a "
            "new --output-dir"
        )

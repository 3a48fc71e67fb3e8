"""Rank worker for test_universal_checkpoint.py: several real trainer runs in one launch, some of them
resumed from checkpoints written with another number of ranks, ZeRO stage or precision.

    universal_resume.py OUT RUN... -- FINETUNE_FLAGS...      RUN = NAME:DS_CONFIG:PRECISION[:FROM[:FLAG,...]]

Each RUN is `bertscale finetune FINETUNE_FLAGS --ds-config DS_CONFIG --PRECISION --output-dir OUT/NAME`,
plus `--resume FROM` (a step-N checkpoint) and the run's own FLAGs (--name=value) when given.
Launching ranks costs ~20 s of imports on 2 cores, so one launch trains every run of its rank count.
Besides the run's own files (metrics.jsonl, checkpoints, final/), each rank writes
OUT/NAME/rng_rank{R}.json: its first torch.rand after the resume or after the step-3 save, drawn
without moving the stream the run goes on with.
"""

import json
import sys
from pathlib import Path

import torch

from bertscale import distributed as dist
from bertscale import trainer
from bertscale.cli import finetune
from bertscale.cli_options import make_run

DRAW_AFTER_SAVE_AT = 3


def draw(folder: Path) -> None:
    """torch.rand(1) of this rank, written down; the stream is put back as it was."""
    state = torch.get_rng_state()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rng_rank{dist.rank()}.json").write_text(json.dumps(torch.rand(1).item()))
    torch.set_rng_state(state)


def recording(out: Path):
    """trainer.resume and trainer.save that also draw (see the module docstring)."""
    resume, save = trainer.resume, trainer.save
    current = {}

    def resume_and_draw(engine, ckpt, *args, **kwargs):
        resume(engine, ckpt, *args, **kwargs)
        draw(out / current["name"])

    def save_and_draw(t):
        path = save(t)
        if not current["resumed"] and t.state.step == DRAW_AFTER_SAVE_AT:
            draw(out / current["name"])
        return path

    trainer.resume, trainer.save = resume_and_draw, save_and_draw
    return current


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]  # added by the launcher
    ours, flags = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    out, specs = Path(ours[0]), ours[1:]
    dist.setup()
    current = recording(out)
    for spec in specs:
        name, ds_config, precision, *source = spec.split(":", 4)
        current.update(name=name, resumed=bool(source))
        run_flags = [*flags, "--ds-config", ds_config, f"--{precision}", "--output-dir", str(out / name)]
        run_flags += ["--resume", source[0], *(source[1].split(",") if len(source) > 1 else [])] if source else []
        trainer.train(make_run(finetune.make_context("finetune", run_flags)))
    dist.teardown()
    dist.exit_process(0)  # see its docstring: finalization can abort a finished rank


if __name__ == "__main__":
    main(sys.argv[1:])

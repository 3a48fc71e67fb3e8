"""Rank worker for test_checkpoint.py: exact resume for several ZeRO stage x precision combos in one launch.

    ckpt_resume_matrix.py OUT COMBO... [--engine-logits CKPT FILE] -- FINETUNE_FLAGS...

Launching 2 ranks costs ~20 s of imports on 2 cores, so one launch trains every COMBO
(zero2-fp32, zero3-bf16, ...) with the real trainer, from the same flags `bertscale finetune` parses:
  OUT/<combo>/straight  FINETUNE_FLAGS, a checkpoint every 2 steps
  OUT/<combo>/resumed   the same flags + --resume OUT/<combo>/straight/checkpoints/step-2
Both runs are configured for the same number of steps, so the LR schedule is the same; the test
compares their metrics.jsonl losses step by step. Stopping and resuming in fresh processes
(SIGTERM, SIGKILL) is covered by the test's own launches.

--engine-logits then builds a fresh engine, loads CKPT into it (recording how torch.load was
called) and saves the logits of a fixed batch, the batch and the record to FILE (export test).
"""

import sys
from pathlib import Path

import torch

from bertscale import checkpoint, data, ds_config, models, tasks
from bertscale import distributed as dist
from bertscale import engine as engines
from bertscale.cli import finetune
from bertscale.cli_options import make_run
from bertscale.trainer import seed_everything, train

SAVE_EVERY = 2  # resuming at step 2: DeepSpeed's CPU Adam needs its beta**3 replayed (checkpoint.py)


def run_config(flags: list[str]):
    """The Run `bertscale finetune FLAGS` would train with (click parses the flags)."""
    return make_run(finetune.make_context("finetune", list(flags)))


def straight_and_resumed(out: Path, combo: str, flags: list[str]) -> None:
    zero, precision = combo.split("-")
    flags = [*flags, "--ds-config", zero, f"--{precision}", "--save-every", str(SAVE_EVERY)]
    straight = out / combo / "straight"
    train(run_config([*flags, "--output-dir", str(straight)]))
    step = checkpoint.root(straight) / f"step-{SAVE_EVERY}"
    train(run_config([*flags, "--output-dir", str(straight.with_name("resumed")), "--resume", str(step)]))


def engine_logits(ckpt: Path, dest: Path, flags: list[str]) -> None:
    """Fresh engine as configured by the checkpoint's run + CKPT -> logits of 8 training rows (eval mode)."""
    setup = checkpoint.read_state(ckpt)
    run = run_config([*flags, "--ds-config", f"zero{setup['zero_stage']}", f"--{setup['precision']}"])
    seed_everything(run.optim.seed)
    task = tasks.build(run, models.load_tokenizer(run.model.model))
    feats = task.train_features()
    cfg = ds_config.fill_schedule(engines.resolve_config(run.optim, dist.world_size()), run.optim, run.optim.max_steps)
    engine = engines.build(run.model, run.optim.weight_decay, task, cfg)
    weights_only = []  # how every torch.load during the resume was called (a spy: it still loads)
    real_load = torch.load

    def spy(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    torch.load = spy
    try:
        checkpoint.load(engine, ckpt, run.optim.seed)
    finally:
        torch.load = real_load
    batch = task.collate(data.rows_of(feats, list(range(8))))
    inputs = {k: batch[k] for k in task.model_input_names}
    engine.eval()
    with torch.no_grad():
        out = engine(**inputs)
    if dist.is_main():
        torch.save(
            {
                "inputs": inputs,
                "start_logits": out.start_logits,
                "end_logits": out.end_logits,
                "load_weights_only": weights_only,
            },
            dest,
        )


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]  # added by the launcher
    ours, flags = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    logits = None
    if "--engine-logits" in ours:
        i = ours.index("--engine-logits")
        logits, ours = (Path(ours[i + 1]), Path(ours[i + 2])), ours[:i] + ours[i + 3 :]
    out, combos = Path(ours[0]), ours[1:]
    dist.setup()
    for combo in combos:
        straight_and_resumed(out, combo, flags)
    if logits:
        engine_logits(*logits, flags)
    dist.teardown()
    dist.exit_process(0)  # see its docstring: finalization can abort a finished rank


if __name__ == "__main__":
    main(sys.argv[1:])

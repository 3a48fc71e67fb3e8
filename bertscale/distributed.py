"""The one place that knows how ranks are launched: deepspeed launcher, torchrun, srun, or plain.

Everything else asks `rank()`, `world_size()`, `is_main()` and never reads launcher env vars.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import re
import socket
import subprocess
import sys
from typing import NoReturn

from . import console, op_builds

_joined = False  # whether this process set up a process group (see exit_process)
_cpu_group = None  # see cpu_group()


def _from_slurm() -> None:
    """Translate srun's env into the torch.distributed one (unless a launcher already set it)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if os.environ.get("SLURM_STEP_ID") is None and int(os.environ["SLURM_NTASKS"]) > 1:
        return  # the batch shell itself, not a task started by srun
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04,07],gpu3" -> "node01": enough for the common bracket form.
    m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(local_rank_flag: int | None = None) -> None:
    """Initialise torch.distributed through DeepSpeed; a single plain process becomes world size 1."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    global _joined
    if dist.is_available() and dist.is_initialized():
        return
    _joined = True
    _from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK=str(local_rank_flag or 0),
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
        )
    os.environ.setdefault("LOCAL_RANK", str(local_rank_flag or 0))
    backend = get_accelerator().communication_backend_name()
    if backend not in ("nccl", "gloo", "hccl", "xccl"):
        backend = "gloo"  # the CPU accelerator says 'ccl' when oneCCL is absent; gloo always works
    timeout = datetime.timedelta(seconds=int(os.environ.get("BERTSCALE_DIST_TIMEOUT", "600")))
    op_builds.install(first_local_rank=local_rank() == 0)  # before DeepSpeed loads its first op
    with console.quiet_output():  # DeepSpeed prints that it built its shared-memory op, on every rank
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    console.after_import()
    if get_accelerator().device_name() == "cuda":
        get_accelerator().set_device(local_rank())
    else:
        share_cpu_cores()
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    if console.verbose():
        print(f"[bertscale] rank {rank()}/{world_size()} local_rank {local_rank()} host {host}", file=sys.stderr)
    hosts = [None] * world_size()
    dist.all_gather_object(hosts, host)
    if is_main():
        print(f"[bertscale] {_placement(hosts)}, backend {backend}", file=sys.stderr, flush=True)


def share_cpu_cores() -> None:
    """On CPU, give each rank its share of the node's cores, unless OMP_NUM_THREADS says otherwise:
    torch's default (every core, in every rank) oversubscribes the node N-fold."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(max(1, usable_cores() // local_world_size()))


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a Slurm or cgroup allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _placement(hosts: list[str]) -> str:
    """'4 ranks on 2 hosts (a: 0-1, b: 2-3)': where each rank runs, in one line."""
    ranks: dict[str, list[int]] = {}
    for r, h in enumerate(hosts):
        ranks.setdefault(h, []).append(r)
    spans = ", ".join(f"{h}: {rs[0]}" + (f"-{rs[-1]}" if len(rs) > 1 else "") for h, rs in list(ranks.items())[:8]) + (
        ", ..." if len(ranks) > 8 else ""
    )
    n = len(hosts)
    return f"{n} rank{'s' * (n != 1)} on {len(ranks)} host{'s' * (len(ranks) != 1)} ({spans})"


def teardown() -> None:
    """Leave together and close the process group: ranks that simply exit can abort the peer
    still shutting down its gloo/NCCL connections (seen as a SIGABRT after a finished run)."""
    import torch.distributed as dist

    global _cpu_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _cpu_group = None
    release_shm()


def joined() -> bool:
    return _joined


def exit_process(code: int = 0) -> NoReturn:
    """End a rank without interpreter finalization, once its work is written and it has left.

    Finalization destroys the gloo and DeepSpeed objects that Python still references in no set
    order, and now and then a rank that finished cleanly dies there ("terminate called without an
    active exception", exit -6; see pytorch/pytorch PR #179291). The launcher and Slurm then see a
    failed run, or a preempted one that is not requeued. Only processes that joined a process group
    end this way; everything else exits normally."""
    if not _joined:
        sys.exit(code)
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=code)  # its atexit hook will not run; an open run would stay "running"
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def release_shm() -> None:
    """DeepSpeed's CPU accelerator leaves a 66 MB shared-memory allreduce buffer per rank in
    /dev/shm (named after the master port); /dev/shm is RAM, so remove ours."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_PORT', '-')}_{rank()}"):
        with contextlib.suppress(OSError):
            os.remove(f)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_world_size() -> int:
    """Ranks on this node (torchrun and the deepspeed launcher say; srun: tasks on this node)."""
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_first(fn):
    """Run fn on rank 0 first (it fills the datasets cache), then on the others (cache hits)."""
    from .errors import UserError

    if world_size() == 1:
        return fn()
    if is_main():
        try:
            result = fn()
        except UserError as e:
            broadcast_object(str(e))  # release the other ranks with the same error
            raise
        broadcast_object(None)
        return result
    err = broadcast_object(None)
    if err is not None:
        raise UserError(err, echo=False)  # rank 0 already printed it
    return fn()


def gather_objects(obj):
    """All ranks send a picklable object; rank 0 gets the list (others get None)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cpu_group():
    """A process group for small CPU-side agreements (gloo; the default group when that is gloo
    already), made on first use, by every rank at the same point; None without a process group."""
    import torch.distributed as dist

    global _cpu_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _cpu_group is None:
        _cpu_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _cpu_group


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any rank (for stop signals that reach only some ranks)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: list, device=None) -> list[float]:
    """The mean over ranks of each value (floats or 0-d tensors, on `device`), in one all-reduce."""
    import torch
    import torch.distributed as dist

    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach() for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return stacked.tolist()

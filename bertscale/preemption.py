"""Stop requests: SIGTERM/SIGUSR1 (Slurm preemption) and a first SIGINT ask for a checkpoint at the
next step boundary; a second SIGINT stops at once."""

from __future__ import annotations

import signal
import sys

from . import distributed as dist


class StopFlag:
    def __init__(self):
        self.requested = False
        self._pending = None  # (work, flag tensor) of the all-reduce started at the last agreed()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"[bertscale] rank {dist.rank()}: got {signal.Signals(signum).name}, "
            "saving a checkpoint at the next step boundary",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self) -> bool:
        """True on every rank, at the same step, once any rank was asked to stop (a signal may reach
        only some ranks). Each call starts an asynchronous all-reduce of this rank's flag on a CPU
        (gloo) group and reads the one the call before started: it finished during the step in
        between, so the step neither waits for the other ranks nor synchronises the GPU. A signal is
        acted on one step after it arrives."""
        group = dist.cpu_group()
        if group is None:
            return self.requested
        import torch
        import torch.distributed as tdist

        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = (tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=group, async_op=True), flag)
        return agreed

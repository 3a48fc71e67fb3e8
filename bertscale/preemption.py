"""Stop requests: SIGTERM/SIGUSR1 (Slurm preemption) and a first SIGINT ask for a checkpoint at the
next step boundary; a second SIGINT stops at once."""

from __future__ import annotations

import signal
import sys

from . import distributed as dist


class StopFlag:
    def __init__(self):
        self.requested = False
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
        """True on every rank once any rank was asked to stop (a signal may reach only some ranks)."""
        return dist.any_rank(self.requested)

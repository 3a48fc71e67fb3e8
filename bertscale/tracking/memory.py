"""Memory of rank 0 for the metrics rows: CUDA allocator figures, or the process RSS on CPU."""

from __future__ import annotations

import contextlib


def memory_stats() -> dict:
    """Rank 0's memory: CUDA allocated/reserved/peak, or the process RSS and its peak on CPU."""
    import torch

    gib = 2**30
    if torch.cuda.is_available():
        return {
            "mem_allocated_gib": torch.cuda.memory_allocated() / gib,
            "mem_reserved_gib": torch.cuda.memory_reserved() / gib,
            "mem_peak_gib": torch.cuda.max_memory_allocated() / gib,
        }
    fields = {"VmRSS:": "mem_rss_gib", "VmHWM:": "mem_rss_peak_gib"}
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0] + ":"
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024 / gib  # the file says kB
    return out

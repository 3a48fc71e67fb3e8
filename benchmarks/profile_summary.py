"""A torch.profiler run summarised as text: the top kernels by device time, and how long the device
sat idle between kernels (the gaps, largest first, with the kernels on either side).

    with torch.profiler.profile(activities=...) as prof:
        ...
    print(summarize(prof, cuda=True))

On CUDA the timeline is the GPU kernels (and memcpy/memset); on a CPU run (gpu_check.sh --dry-run)
it is the top-level CPU operators, so the same report has something to show.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize(prof, cuda: bool, top: int = 15, gaps: int = 10) -> str:
    timeline = device_timeline(prof, cuda)
    what = "GPU kernels" if cuda else "top-level CPU operators"
    return "\n".join(
        [
            top_report(timeline, top, what),
            "",
            idle_report(timeline, gaps, what),
            "",
            f"torch key_averages, top {top} by self {'device' if cuda else 'CPU'} time:",
            _op_table(prof, cuda, top),
        ]
    )


def _op_table(prof, cuda: bool, top: int) -> str:
    averages = prof.key_averages()
    for sort in ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",):
        try:
            return averages.table(sort_by=sort, row_limit=top, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=top, max_name_column_width=60)


def top_report(timeline, top: int, what: str) -> str:
    """The `top` names by total time on the device, with calls and share of the busy time."""
    totals: dict[str, list[float]] = {}
    for start, stop, name in timeline:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += stop - start
    busy = sum(t for _, t in totals.values()) or 1.0
    lines = [f"top {top} {what} by total time:", f"{'ms':>10} {'share':>6} {'calls':>6}  name"]
    for name, (calls, total) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{total / 1e3:10.2f} {total / busy:6.1%} {calls:6d}  {name[:100]}")
    return "\n".join(lines)


def device_timeline(prof, cuda: bool) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of what ran on the device, sorted, from the exported trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    if cuda:
        spans = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    else:  # top-level operators only: nested ones would hide nothing and double the count
        spans = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    timeline = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?")) for e in spans)
    if not cuda:
        timeline = _outermost(timeline)
    return timeline


def _outermost(timeline):
    kept, end = [], float("-inf")
    for start, stop, name in timeline:
        if start >= end:
            kept.append((start, stop, name))
            end = stop
    return kept


def idle_report(timeline, gaps: int, what: str) -> str:
    """Busy and idle time over the span from the first to the last event, and the largest gaps."""
    if not timeline:
        return f"idle gaps: no {what} recorded"
    busy, idle, end = 0.0, [], timeline[0][0]
    previous = ""
    for start, stop, name in timeline:
        if start > end:
            idle.append((start - end, previous, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, previous = stop, name
    span = end - timeline[0][0]
    idle_total = sum(g for g, _, _ in idle)
    lines = [
        f"idle gaps between {what}: {len(timeline)} events over {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, "
        f"idle {idle_total / 1e3:.1f} ms ({idle_total / span if span else 0:.1%}) in {len(idle)} gaps "
        f"(median gap {_median([g for g, _, _ in idle]):.1f} us)",
        f"largest {gaps} gaps:",
    ]
    for gap, before, after in sorted(idle, reverse=True)[:gaps]:
        lines.append(f"  {gap / 1e3:8.2f} ms  after {before[:60]!r} before {after[:60]!r}")
    return "\n".join(lines)


def _median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0

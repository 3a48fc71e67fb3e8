"""How bertscale meets DeepSpeed's C++ ops (installed once per process, before DeepSpeed loads any):

- The first run on a machine compiles them (on CPU the shared-memory allreduce and fused Adam: 26 s
  and 43 s on a 2-core VM; on GPU fused Adam, and CPU Adam for offload), with nothing else on the
  console, which looks like a hang. The first local rank says so before each build.
- Loading them asks py-cpuinfo for the CPU's flags two or three times, and each answer spawns a
  fresh Python process (about 1 s each on a small machine) for a fact that cannot change: the
  answer is kept for the life of the process.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path


def install(first_local_rank: bool) -> None:
    announce_builds(first_local_rank)
    ask_cpuinfo_once()


def announce_builds(say: bool) -> None:
    """From now on, print a line (where `say`) before DeepSpeed builds an op that this machine has
    not built yet; ops already built, or installed with DeepSpeed, say nothing."""
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:
        return
    build = OpBuilder.jit_load
    if getattr(build, "announces", False):
        return

    def jit_load(self, verbose=True):
        folder = unbuilt(self.name)
        if folder and say:
            # sys.__stderr__: the caller may be swallowing the library's own output (console.quiet_output)
            print(
                f"[bertscale] building DeepSpeed's {self.name} op for this machine, once, into {folder} "
                "(it can take minutes; later runs load it)",
                file=sys.__stderr__,
                flush=True,
            )
        return build(self, verbose)

    jit_load.announces = True
    OpBuilder.jit_load = jit_load


def unbuilt(name: str) -> str | None:
    """The folder torch builds op `name` into (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions,
    per Python and CUDA version) while it holds no built library; None once it does."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # torch moved it: build without the line rather than fail the run
        return None
    folder = Path(_get_build_directory(name, verbose=False))
    return None if (folder / f"{name}.so").exists() else str(folder)


def ask_cpuinfo_once() -> None:
    """Remember py-cpuinfo's answer for the life of the process; callers get a copy, so none can
    alter what the next one reads."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then reads lscpu itself
        return
    if getattr(cpuinfo.get_cpu_info, "asked_once", False):
        return
    answer = functools.cache(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        return copy.deepcopy(answer())

    get_cpu_info.asked_once = True
    cpuinfo.get_cpu_info = get_cpu_info

"""Say when DeepSpeed compiles one of its C++ ops. The first run on a machine builds them (on CPU the
shared-memory allreduce and fused Adam; on GPU fused Adam, and CPU Adam for offload): 26 s and 43 s
on a 2-core VM, with nothing else on the console, which looks like a hang."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def announce() -> None:
    """From now on, the first local rank prints a line before DeepSpeed builds an op that this
    machine has not built yet (ops already built, or installed with DeepSpeed, say nothing)."""
    try:
        from deepspeed.ops.op_builder.builder import OpBuilder
    except ImportError:
        return
    build = OpBuilder.jit_load
    if getattr(build, "announces", False):
        return

    def jit_load(self, verbose=True):
        folder = unbuilt(self.name)
        if folder and os.environ.get("LOCAL_RANK", "0") == "0":
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

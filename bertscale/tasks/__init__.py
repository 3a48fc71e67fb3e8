"""Task registry: a task name -> its Task class (imported lazily: each pulls its own deps)."""
from __future__ import annotations

from ..errors import UserError

NAMES = ("squad", "squad_v2", "classify", "glue:<name>", "pretrain")


def get(name: str):
    if name in ("squad", "squad_v2"):
        from .squad import TASKS
    elif name == "classify" or name.startswith("glue:"):
        from .classify import TASKS
    elif name == "pretrain":
        from .pretraining import TASKS
    else:
        raise UserError(f"--task {name}: unknown task; choose one of {', '.join(NAMES)}")
    return TASKS["classify" if name.startswith("glue:") else name]

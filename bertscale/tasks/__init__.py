"""Task registry: a task name -> its Task class (imported lazily: each pulls its own deps)."""
from __future__ import annotations

from ..errors import UserError

NAMES = ("squad", "squad_v2", "classify", "glue:<name>", "pretrain")


def get(name: str):
    if name in ("squad", "squad_v2"):
        from .squad import TASKS

        return TASKS[name]
    if name == "pretrain":
        from .pretraining import TASKS

        return TASKS[name]
    if name == "classify" or name.startswith("glue:"):
        from .classify import task_for

        return task_for(name)  # raises for an unknown GLUE name
    raise UserError(f"--task {name}: unknown task; choose one of {', '.join(NAMES)}")

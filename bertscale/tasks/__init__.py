"""Task registry: every module of this package may register Task classes with `@register`; a user's
own task is named by its file or import path (`--task my_task.py:MyTask`, `--task pkg.mod:MyTask`).

Nothing outside a task's own module names a task: the CLI, trainer, predict and plan ask here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from ..errors import UserError, first_line

_registered: list[type] = []
_loaded = False


def register(cls):
    """Class decorator: make a Task findable by its `names`."""
    if cls not in _registered:
        _registered.append(cls)
    return cls


def builtin() -> list[type]:
    """The registered task classes of this package (its modules are imported once, on first use)."""
    global _loaded
    if not _loaded:
        for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):  # same order everywhere
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True
    return list(_registered)


def default_name() -> str:
    """The task `finetune` and `plan` run without --task."""
    return next(cls.names[0] for cls in builtin() if cls.is_default)


def preparing() -> list[type]:
    """The registered tasks whose data `bertscale prepare` makes ahead of training (they implement
    Task.prepare)."""
    from .base import Task

    return [cls for cls in builtin() if cls.prepare is not Task.prepare]


def names() -> list[str]:
    """The registered task names as a user types them (a pattern "glue:*" as "glue:<name>")."""
    return sorted(name.replace(":*", ":<name>") for cls in builtin() for name in cls.names)


def is_user_spec(spec: str) -> bool:
    """`file.py:Class` or `package.module:Class`, as opposed to a registered name (glue:sst2 has a colon too)."""
    return ":" in spec and not any(cls.matches(spec) for cls in builtin())


def resolve(spec: str) -> type:
    """The Task class for a --task value: a registered name, else a user's `file.py:Class` or
    `module:Class`."""
    for cls in builtin():
        if cls.matches(spec):
            return cls
    if ":" in spec:
        return load_user_task(spec)
    raise UserError(
        f"--task {spec}: unknown task; choose one of {', '.join(names())}, or name your own "
        "task class as path/to/file.py:ClassName or package.module:ClassName"
    )


def canonical(spec: str) -> str:
    """A task name as the run records it: a user task's file as an absolute path, so that a resume,
    `evaluate` or `predict` started from another directory finds the same class."""
    if is_user_spec(spec):
        where, _, cls_name = spec.rpartition(":")
        if where.endswith(".py"):
            return f"{Path(where).resolve()}:{cls_name}"
    return spec


def load_user_task(spec: str) -> type:
    from .base import Task

    where, _, cls_name = spec.rpartition(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"--task {spec}: no such file {where}")
        module_name = "bertscale_user_task_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # pickling (datasets.map workers) finds it by name
            try:
                module_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[module_name]
                raise UserError(
                    f"--task {spec}: importing {where} failed ({type(e).__name__}: {first_line(e)})"
                ) from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"--task {spec}: cannot import {where} ({first_line(e)})") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        found = "not found" if cls is None else "not a subclass of bertscale.tasks.base.Task"
        raise UserError(f"--task {spec}: {cls_name} is {found} in {where}")
    return cls


def name_for_model(model_config):
    """The task that made (or can use) a trained model: the one recorded in its config by bertscale,
    else the first task that handles its architecture; None if none does."""
    recorded = getattr(model_config, "bertscale_task", None)
    if recorded:
        return recorded
    arch = (getattr(model_config, "architectures", None) or [""])[0]
    cls = next((cls for cls in builtin() if any(arch.endswith(a) for a in cls.architectures)), None)
    return cls.names[0] if cls else None


def build(run, tokenizer):
    """The run's task instance."""
    return resolve(run.task)(tokenizer, **settings(run))


def settings(run) -> dict:
    """What a task is told about the run: its name, its own flags, the data flags, seed and best metric."""
    return dict(
        name=run.task, args=run.task_args, data=run.data, seed=run.optim.seed, metric_for_best=run.eval.metric_for_best
    )


def make_run(task: str | None = None, **flags):
    """A Run from flat flag values (field names, as click hands them over), for the named task or
    the default one; flags left out keep their defaults."""
    from ..args import split_values

    spec = task or default_name()
    return split_values({**flags, "task": canonical(spec)}, resolve(spec).Args)

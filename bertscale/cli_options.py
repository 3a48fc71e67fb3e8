"""Click options from the typed argument groups (args.py) and from each task's own `Args`/`Predict`.

The options of the built-in tasks are made on first use (importing the tasks imports torch, which
`bertscale --help` does not need); a user's task named with `--task file.py:Class` adds its own
before the command line is parsed. --help shows one section per group and per task.
"""

from __future__ import annotations

import dataclasses
import os
import typing

import click

from . import args as groups
from .errors import UserError


def _click_type(hint):
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    base = inner[0] if inner else hint
    return {int: int, float: float, str: str, bool: bool, tuple: str}.get(base, str), base


def field_options(cls, command: str, section: str) -> list[click.Option]:
    """A click option per field of dataclass `cls` that `command` shows, with its help, default and
    BERTSCALE_<NAME> environment variable; `section` is the --help heading it is listed under."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in groups.fields_for(cls, command):
        flag, envvar = groups.flag_name(f.name), f"BERTSCALE_{f.name.upper()}"
        ctype, base = _click_type(hints[f.name])
        extra = dict(f.metadata.get("click", {}))
        choices = extra.pop("type_choices", None)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "precision":  # --fp16 / --bf16 / --fp32 set one field
            options += [
                click.Option(
                    [f"--{p}", "precision"],
                    flag_value=p,
                    help=f'Train in {p} (default: as --ds-config says; fp16 on GPU, fp32 on CPU when it says "auto").',
                )
                for p in choices
            ]
        elif base is bool:
            options.append(
                click.Option(
                    [f"{flag}/--no-{flag[2:]}", f.name],
                    default=default,
                    envvar=envvar,
                    show_default=True,
                    help=f.metadata["help"],
                )
            )
        else:
            options.append(
                click.Option(
                    [flag, f.name],
                    type=click.Choice(choices) if choices else ctype,
                    default=default,
                    envvar=envvar,
                    show_default=True,
                    show_envvar=False,
                    help=f.metadata["help"],
                    **extra,
                )
            )
    for option in options:
        option.section = section
    return options


def task_options(classes, command: str, attribute: str = "Args") -> list[click.Option]:
    """Options of the tasks' own dataclasses (`Args`, or `Predict`), under the heading of the first
    task that has them, naming every task that shares them; a flag is listed once."""
    sharing: dict[type, list] = {}
    for cls in classes:
        if getattr(cls, attribute) is not None:
            sharing.setdefault(getattr(cls, attribute), []).append(cls)
    seen, options = set(), []
    for fields_cls, owners in sharing.items():
        section = f"{owners[0].title} (--task {', '.join(n for c in owners for n in c.names)})"
        for option in field_options(fields_cls, command, section):
            if option.name not in seen:
                seen.add(option.name)
                option.task_flag = True  # make_run refuses it when another task runs
                options.append(option)
    return options


def run_options(command: str, fixed_task: str | None) -> list[click.Option]:
    from . import tasks

    options = []
    for _, cls, heading in groups.GROUPS:
        options += field_options(cls, command, heading)
    if fixed_task is None:
        offered = tasks.preparing() if command == "prepare" else [c for c in tasks.builtin() if c.command == "finetune"]
        runs_here = [n.replace(":*", ":<name>") for c in offered for n in c.names]
        default = tasks.default_name() if command == "finetune" else None
        if command == "prepare" and len(offered) == 1:
            default = offered[0].names[0]  # the one task that prepares: no need to name it
        task = click.Option(
            ["--task", "task"],
            default=default,
            envvar="BERTSCALE_TASK",
            show_default=True,
            help=f"Task: {', '.join(runs_here)}, or your own as path/to/file.py:ClassName or "
            "package.module:ClassName"
            + (" (default: the task the model was trained on)." if command == "evaluate" else "."),
        )
        task.section = "Task"
        options.insert(0, task)
    return options + task_options(tasks.builtin(), command)


def predict_options() -> list[click.Option]:
    from . import tasks

    fixed = [
        click.Option(["--model"], required=True, help="Exported model directory (e.g. OUTPUT_DIR/final)."),
        click.Option(
            ["--task"],
            default=None,
            envvar="BERTSCALE_TASK",
            help="Task whose prediction to run (default: the task the model was trained on).",
        ),
        click.Option(["--max-seq-length"], default=384, show_default=True, help="Tokens per window."),
    ]
    for option in fixed:
        option.section = "Model"
    return fixed + task_options(tasks.builtin(), "predict", "Predict")


class RunCommand(click.Command):
    """A command whose options are the argument groups plus the tasks' own; the callback receives the
    Run built from them (or, with `options`, the raw values)."""

    def __init__(self, name, callback, command_key: str, fixed_task: str | None = None, options=None, **kwargs):
        self.command_key, self.fixed_task, self.make_options = command_key, fixed_task, options
        self._params = None
        super().__init__(name, callback=callback, **kwargs)

    @property
    def params(self) -> list:
        """The same list object every time (click appends to it and pops from it), built on first use."""
        if self._params is None:
            made = self.make_options() if self.make_options else run_options(self.command_key, self.fixed_task)
            for param in self._fixed:  # the command's own options, under its own heading
                param.section = getattr(param, "section", self.command_key.capitalize())
            self._params = [*self._fixed, *made]
        return self._params

    @params.setter
    def params(self, value):
        self._fixed = list(value)
        self._params = None

    def parse_args(self, ctx, args):
        spec = self.fixed_task or _task_argument(args) or os.environ.get("BERTSCALE_TASK")
        if spec:
            self._add_user_task(spec)
        return super().parse_args(ctx, args)

    def _add_user_task(self, spec: str) -> None:
        from . import tasks

        if not tasks.is_user_spec(spec):
            return
        cls = tasks.resolve(spec)
        attribute = "Predict" if self.make_options else "Args"
        for option in task_options([cls], self.command_key, attribute):
            # A flag a built-in task has too (--text-column) becomes this task's: its help, its default.
            same = [i for i, p in enumerate(self.params) if p.name == option.name]
            if same:
                self.params[same[0]] = option
            else:
                self.params.append(option)

    def invoke(self, ctx):
        if self.make_options:
            return super().invoke(ctx)
        # Options declared on the command itself (click decorators) are its own: they go to the
        # callback as they are; the rest make the Run.
        own = {p.name: ctx.params.pop(p.name) for p in self._fixed if p.name in ctx.params}
        return ctx.invoke(self.callback, run=make_run(ctx, self.fixed_task), **own)

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                sections.setdefault(getattr(param, "section", "Other"), []).append(record)
        for heading, records in sections.items():
            with formatter.section(f"{heading} options"):
                formatter.write_dl(records)


def _task_argument(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--task" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return None


def make_run(ctx, fixed_task: str | None = None) -> groups.Run:
    """The Run from a parsed command line: the task's own flags go to its Args; a flag of another
    task given on the command line is refused (it would silently do nothing)."""
    from . import tasks

    values = dict(ctx.params)
    spec = fixed_task or values.pop("task", None) or _task_of_model(values.get("model"))
    cls = tasks.resolve(spec)
    own = {f.name for f in dataclasses.fields(cls.Args)}
    given = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    for option in ctx.command.params:
        if not getattr(option, "task_flag", False) or option.name not in values:
            continue
        if option.name not in own:
            if ctx.get_parameter_source(option.name) == click.core.ParameterSource.COMMANDLINE:
                raise UserError(f"{option.opts[0]} is a flag of {option.section}; this run's --task is {spec}")
            values.pop(option.name)
        elif ctx.get_parameter_source(option.name) not in given:
            values.pop(option.name)  # not given: the task's own default (another task may share the flag)
    return tasks.make_run(spec, **values)


def _task_of_model(model: str | None) -> str:
    from . import models, tasks

    config = models.load_config(model) if model else None
    name = tasks.name_for_model(config) if config is not None else None
    if name is None:
        raise UserError(f"--model {model}: it does not say which task it was trained for; pass --task")
    return name

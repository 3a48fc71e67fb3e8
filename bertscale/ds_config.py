"""Load a DeepSpeed JSON, fill its "auto" values from the optimisation flags, and check it.

Every error names the file and the key, because a DeepSpeed config error otherwise surfaces as a
pydantic traceback or, worse, as a silently ignored key.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from .errors import UserError, first_line

PRESET_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
# Keyword arguments of the optimizer/scheduler class DeepSpeed builds later: its config reader does not look at them.
CONSTRUCTOR_ARGS = ("optimizer.params.", "scheduler.params.")
SCHEDULE_LENGTHS = ("scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps")


def resolve_path(name: str) -> Path:
    """A path, or a preset name from ds_configs/ (zero2, zero3.json, ds_configs/zero3.json...)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (PRESET_DIR / p.name, PRESET_DIR / f"{p.name}.json"):
        if cand.is_file():
            return cand
    presets = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.json")))
    raise UserError(f"--ds-config {name}: no such file, and not a preset (presets: {presets})")


def load(name: str) -> tuple[Path, dict]:
    path = resolve_path(name)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: the top level must be a JSON object")
    return path, cfg


def check_with_deepspeed(path, cfg: dict) -> None:
    """Let the installed DeepSpeed read the config, recording every key it looks up: a key it never
    asks for is one it would silently ignore (a typo), and its own pydantic sections refuse theirs.
    So what is accepted follows the installed version, not a list kept here."""
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger

    # Left out: train_batch_size (DeepSpeed would check it against its own world size of 1; fill does)
    # and "auto" values (reported after the key check, as a key with a typo may hold one).
    probe = _Reads.wrap(_without_auto({k: v for k, v in cfg.items() if k != "train_batch_size"}))
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as e:
        raise _pydantic_error(path, cfg, e) from None
    except Exception as e:  # DeepSpeed's own assertions and ValueErrors
        raise UserError(f"{path}: DeepSpeed rejects this config ({first_line(e)})") from None
    finally:
        logger.setLevel(level)
    for where, node in probe.nodes():
        if where in CONSTRUCTOR_ARGS or not node.seen:
            continue  # handed whole to a pydantic model (it checks its keys) or to the optimizer
        for key in _node_at(cfg, where):  # the file's keys, "auto" ones too (a typo'd key may hold one)
            if key not in node.seen:
                raise _unknown(path, where, key, node.seen)


class _Reads(dict):
    """A dict that records which keys were looked up (get, [], in, keys())."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: set = set()
        self.expanded = False  # handed whole to a pydantic model as **kwargs: it checks the keys itself

    @classmethod
    def wrap(cls, obj):
        if isinstance(obj, dict):
            return cls({k: cls.wrap(v) for k, v in obj.items()})
        return obj

    def nodes(self, where: str = ""):
        """(dotted path, node) of this dict and the dicts below it, except what a pydantic model checked."""
        if where and self.expanded:
            return
        yield where, self
        for k, v in self.items():
            if isinstance(v, _Reads):
                yield from v.nodes(f"{where}{k}.")

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadKeys(self)

    def __iter__(self):  # defined here, so `**node` takes the slow path through keys() and [] (recorded)
        return super().__iter__()


class _ReadKeys:
    def __init__(self, owner: _Reads):
        self.owner = owner

    def __contains__(self, key):
        return key in self.owner

    def __iter__(self):
        self.owner.expanded = True
        return iter(dict.keys(self.owner))

    def __len__(self):
        return len(self.owner)


def _unknown(path, where, key, known):
    hint = difflib.get_close_matches(str(key), sorted(map(str, known)), n=1)
    did = f"; did you mean '{where}{hint[0]}'?" if hint else ""
    return UserError(f"{path}: unknown key '{where}{key}'{did}")


def _pydantic_error(path, cfg: dict, e) -> UserError:
    """One line naming the section and key of a pydantic error (its own location starts inside the section)."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    section = next((k for k, v in cfg.items() if isinstance(v, dict) and _has_path(v, loc)), None)
    where = f"{section}." if section else ""
    if err["type"] == "extra_forbidden":
        model = _config_model(e.title)
        fields = set(model.model_fields) if model else set()
        inner = ".".join(loc[:-1]) + "." if len(loc) > 1 else ""
        return _unknown(path, where + inner, loc[-1], fields)
    return UserError(f"{path}: {where}{'.'.join(loc)}: {err['msg']}")


def _node_at(cfg: dict, where: str) -> dict:
    for key in filter(None, where.split(".")):
        cfg = cfg[key]
    return cfg


def _has_path(node, loc) -> bool:
    for key in loc:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _config_model(name: str):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _set_auto(section: dict, key: str, value) -> None:
    if section.get(key) == "auto":
        section[key] = value


def fill(
    path, cfg: dict, optim, world_size: int, total_steps: int | None = None, default_precision: str = "fp32"
) -> dict:
    """Return a copy of cfg with every "auto" replaced from the optimisation flags (`optim`), checked:
    batch arithmetic, precision, and every key against the installed DeepSpeed.

    A precision left "auto" by both the file and the flags becomes default_precision (the
    caller picks fp16 on GPUs, fp32 on CPU). With total_steps None the schedule's lengths stay
    "auto" for fill_schedule, once the data has said how many steps there are.
    """
    cfg = _without_notes(cfg)
    _set_auto(cfg, "train_micro_batch_size_per_gpu", optim.micro_batch_size)
    _set_auto(cfg, "gradient_accumulation_steps", optim.grad_accum)
    _set_auto(cfg, "train_batch_size", optim.micro_batch_size * optim.grad_accum * world_size)
    _set_auto(cfg, "gradient_clipping", optim.max_grad_norm)
    opt = _section(cfg, "optimizer").get("params", {})
    _set_auto(opt, "lr", optim.learning_rate)
    _set_auto(opt, "weight_decay", optim.weight_decay)
    sched = _section(cfg, "scheduler").get("params", {})
    _set_auto(sched, "warmup_max_lr", optim.learning_rate)
    _set_auto(sched, "warmup_min_lr", 0.0)
    if total_steps is not None:
        cfg = fill_schedule(cfg, optim, total_steps)
    if optim.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = optim.zero_stage
    for prec in ("fp16", "bf16"):
        sec = cfg.get(prec)
        if isinstance(sec, dict):
            if optim.precision is not None:
                sec["enabled"] = optim.precision == prec
            elif sec.get("enabled") == "auto":
                sec["enabled"] = default_precision == prec
    if _enabled(cfg, "fp16") and _enabled(cfg, "bf16"):
        raise UserError(f"{path}: fp16.enabled and bf16.enabled are both true; choose one (--fp16 or --bf16)")
    zero = _section(cfg, "zero_optimization")
    if zero.get("stage") == "auto":
        zero["stage"] = auto_stage(precision_of(cfg))
    check_with_deepspeed(path, cfg)
    _check_no_auto(path, cfg, "", allowed=() if total_steps is not None else SCHEDULE_LENGTHS)
    _check_batch(path, cfg, world_size)
    # The trainer batches its data with the flags, so a number in the file must agree with them.
    for key, flag, value in (
        ("train_micro_batch_size_per_gpu", "--micro-batch-size", optim.micro_batch_size),
        ("gradient_accumulation_steps", "--grad-accum", optim.grad_accum),
    ):
        if int(cfg.get(key, value)) != value:
            raise UserError(
                f"{path}: '{key}' is {cfg[key]} but {flag} is {value}; "
                f'pass {flag} {cfg[key]} or set the key to "auto"'
            )
    return cfg


def auto_stage(precision: str) -> int:
    """The ZeRO stage of a preset that holds the whole model states on every GPU (single_node).
    16-bit weights: stage 1, whose fp32 master weights DeepSpeed steps in one flat buffer (and whose
    bf16 path honours bf16.check_grad_overflow, stage 0's does not). fp32: stage 0, as there is no
    second precision to keep a master copy in: the optimizer steps the module's own weights, where
    stage 1 would keep a second fp32 copy of them (4 more bytes a parameter), copy every gradient into
    a bucket and take the gradient norm in fp64 (8% of a MiniLM step on CPU)."""
    return 0 if precision == "fp32" else 1


def fill_schedule(cfg: dict, optim, total_steps: int) -> dict:
    """A copy of cfg with the learning-rate schedule's lengths filled: warmup and total steps."""
    cfg = copy.deepcopy(cfg)
    sched = _section(cfg, "scheduler").get("params", {})
    steps = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * total_steps)
    warmup = max(1, steps)  # DeepSpeed rejects 0
    _set_auto(sched, "warmup_num_steps", warmup)
    _set_auto(sched, "total_num_steps", max(total_steps, warmup + 1))
    return cfg


def _without_auto(node):
    if isinstance(node, dict):
        return {k: _without_auto(v) for k, v in node.items() if v != "auto"}
    return node


def _without_notes(node):
    """A deep copy without "_comment"-style keys: notes for humans, which DeepSpeed's sections refuse."""
    if isinstance(node, dict):
        return {k: _without_notes(v) for k, v in node.items() if not str(k).startswith("_")}
    return copy.deepcopy(node)


def _section(cfg: dict, key: str) -> dict:
    value = cfg.get(key, {})
    return value if isinstance(value, dict) else {}


def _enabled(cfg, key):
    return bool(cfg.get(key, {}).get("enabled", False))


def precision_of(cfg: dict) -> str:
    return "fp16" if _enabled(cfg, "fp16") else "bf16" if _enabled(cfg, "bf16") else "fp32"


def _check_no_auto(path, node, where, allowed=()):
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_auto(path, v, f"{where}{k}.", allowed)
    elif node == "auto" and where.rstrip(".") not in allowed:
        raise UserError(
            f"{path}: '{where.rstrip('.')}' is \"auto\" but bertscale has no value for it; set a number in the file"
        )


def _check_batch(path, cfg, world):
    try:
        micro = int(cfg["train_micro_batch_size_per_gpu"])
        accum = int(cfg.get("gradient_accumulation_steps", 1))
        total = int(cfg.get("train_batch_size", micro * accum * world))
    except KeyError:
        raise UserError(f"{path}: 'train_micro_batch_size_per_gpu' is missing (use \"auto\")") from None
    except (TypeError, ValueError):
        raise UserError(f'{path}: batch sizes must be integers or "auto"') from None
    if total != micro * accum * world:
        raise UserError(
            f"{path}: 'train_batch_size' is {total} but train_micro_batch_size_per_gpu * "
            f"gradient_accumulation_steps * world size = {micro} * {accum} * {world} = {micro * accum * world}; "
            'set it to "auto" or fix the arithmetic'
        )

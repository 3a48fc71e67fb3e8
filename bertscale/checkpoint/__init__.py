"""DeepSpeed checkpoints: saving and pruning (save.py), which one a run resumes from (resume.py),
loading it exactly (load.py) or on another setup through a universal checkpoint (universal.py),
weights-only unpickling (safe_load.py), and HF export (export.py)."""

from .export import consolidated_state_dict, export
from .load import load
from .resume import changes, check_same_setup, loads_directly, plan_resume
from .safe_load import safe_load
from .save import STATE_FILE, engine_setup, latest, prune, read_state, root, save
from .universal import check_target as check_universal_target
from .universal import load as load_universal
from .universal import prepare as prepare_universal

__all__ = [
    "STATE_FILE",
    "changes",
    "check_same_setup",
    "check_universal_target",
    "consolidated_state_dict",
    "engine_setup",
    "export",
    "latest",
    "load",
    "load_universal",
    "loads_directly",
    "plan_resume",
    "prepare_universal",
    "prune",
    "read_state",
    "root",
    "safe_load",
    "save",
]

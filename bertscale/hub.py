"""Hub datasets: one loader, one clear message when the hub (or the network) says no."""

from __future__ import annotations

from .errors import UserError, first_line


def load_split(name: str, config: str | None, split: str, *, streaming: bool = False, hint: str = ""):
    """One split of a hub dataset (or a local dataset directory). `hint` tells the user what to
    do instead (e.g. which local-file flags the task takes)."""
    import datasets

    where = name + (f" ({config})" if config else "")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown name or config, missing split: one message for all
        raise UserError(f"--dataset {where}: cannot load split '{split}' ({first_line(e)}). {hint}".rstrip()) from None


def require_columns(data, columns, name: str, split: str, what: str) -> None:
    missing = set(columns) - set(data.column_names or ())
    if missing:
        raise UserError(
            f"--dataset {name}: split '{split}' lacks the {what} columns {sorted(missing)} "
            f"(it has {data.column_names})."
        )

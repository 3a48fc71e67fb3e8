"""`bertscale predict`: one input through an exported model, by the task that made it."""

from __future__ import annotations

from . import models, tasks
from .errors import UserError


def predict(model_dir: str, task: str | None, inputs: dict, max_seq_length: int = 384) -> str:
    """The line to print for `inputs` (the predict flags given); `task` None: the model's own task."""
    config = models.load_config(model_dir)
    spec = task or tasks.name_for_model(config)
    if spec is None:
        arch = (config.architectures or ["?"])[0]
        raise UserError(
            f"{model_dir}: no task predicts with a {arch}; pass --task (question answering and "
            "classification models work without it)"
        )
    cls = tasks.resolve(spec)
    if cls.Predict is None:
        raise UserError(f"--task {spec}: this task does not predict")
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls.Predict)}
    return cls.predict(model_dir, cls.Predict(**{k: v for k, v in inputs.items() if k in names}), max_seq_length)

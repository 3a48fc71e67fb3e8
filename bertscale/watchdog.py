"""fp16 health next to the engine: stop a run whose loss scale has collapsed (after a checkpoint),
instead of DeepSpeed's bare exception or a run that silently learns nothing."""

from __future__ import annotations


class LossScaleWatchdog:
    """fp16 health: stop (after a checkpoint) when the loss scale sits at its minimum and steps
    still overflow, or when most of the last `window` steps overflowed and were skipped."""

    def __init__(self, ds_cfg: dict, optimizer=None, window: int = 50, max_skip_share: float = 0.5):
        fp16 = ds_cfg.get("fp16", {})
        self.enabled = bool(fp16.get("enabled"))
        self.min_scale = float(fp16.get("min_loss_scale", 1))
        self.window, self.max_skip_share = window, max_skip_share
        self.history: list[bool] = []
        scaler = getattr(optimizer, "loss_scaler", None)
        if self.enabled and hasattr(scaler, "raise_error_at_min_scale"):
            # DeepSpeed's ZeRO scaler raises a bare exception, with no checkpoint, on an overflow
            # at the minimum scale; this watchdog makes that decision instead, and saves first.
            scaler.raise_error_at_min_scale = False

    def check(self, scale: float | None, skipped: bool) -> str | None:
        """Returns the error message when the run should stop, else None."""
        if not self.enabled:
            return None
        self.history = (self.history + [skipped])[-self.window :]
        skip_share = sum(self.history) / len(self.history)
        at_min = scale is not None and scale <= self.min_scale and skipped
        if at_min or (len(self.history) == self.window and skip_share > self.max_skip_share):
            why = (
                f"the fp16 loss scale fell to its minimum ({self.min_scale:g}) and steps still overflow"
                if at_min
                else f"{skip_share:.0%} of the last {self.window} steps overflowed and were skipped"
            )
            return (
                f"fp16 training is not learning: {why}. Use --bf16 if the GPU supports it (A100/H100), "
                "or lower --learning-rate, or raise fp16.min_loss_scale in the DeepSpeed config."
            )
        return None

"""What a run reports: the tracker (console, metrics.jsonl, W&B), throughput/MFU, memory, redaction."""

from .memory import memory_stats
from .redact import REDACTED, redact_secrets
from .throughput import PEAK_TFLOPS, Throughput, flops_per_token, non_embedding_params, peak_tflops
from .tracker import ROW_MARKERS, Tracker
from .wandb_run import wandb_mode

__all__ = [
    "PEAK_TFLOPS",
    "REDACTED",
    "ROW_MARKERS",
    "Throughput",
    "Tracker",
    "flops_per_token",
    "memory_stats",
    "non_embedding_params",
    "peak_tflops",
    "redact_secrets",
    "wandb_mode",
]

"""What a user sees: progress on rank 0, metrics.jsonl, W&B, throughput/MFU, memory.

Only rank 0 writes. metrics.jsonl and W&B get the same keys so runs compare without W&B.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from . import distributed as dist

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0,
               "A6000": 155.0, "L40S": 362.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 * non-embedding params (fwd+bwd matmuls) + attention scores."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * h * h + 2 * h * inter  # QKV + output projection + two FFN matmuls (weights)
    return 6 * layers * per_layer + 6 * layers * seq_len * h


def memory_stats() -> dict:
    import torch

    if torch.cuda.is_available():
        gib = 2 ** 30
        return {"mem_allocated_gib": torch.cuda.memory_allocated() / gib,
                "mem_reserved_gib": torch.cuda.memory_reserved() / gib,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / gib}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return {"mem_rss_gib": int(line.split()[1]) / 2 ** 20}
    return {}


def _wandb_mode(requested: str | None) -> tuple[str, str]:
    if requested:
        return requested, f"--wandb-mode {requested}"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or Path("~/.netrc").expanduser().is_file() and \
        "api.wandb.ai" in Path("~/.netrc").expanduser().read_text()
    return ("online", "an API key is configured") if has_key else ("offline", "no W&B API key found")


class Tracker:
    """Rank-0 sink for metrics. Other ranks get a tracker whose methods do nothing."""

    def __init__(self, run, ds_cfg: dict, total_steps: int, resumed: bool):
        self.active = dist.is_main()
        self.total_steps = total_steps
        self.run = run
        self.wandb = None
        self.bar = None
        self.start = time.time()
        if not self.active:
            return
        out = Path(run.output_dir)
        self.metrics_file = open(out / "metrics.jsonl", "a", buffering=1)
        mode, why = _wandb_mode(run.wandb_mode)
        if mode != "disabled":
            self._start_wandb(run, ds_cfg, mode, why, resumed)
        else:
            print("[bertscale] W&B disabled", file=sys.stderr)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

    def _start_wandb(self, run, ds_cfg, mode, why, resumed):
        import wandb

        out = Path(run.output_dir)
        id_file = out / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.wandb = wandb.init(
            project=run.wandb_project, entity=run.wandb_entity, name=run.run_name or out.name,
            group=run.wandb_group or os.environ.get("SLURM_JOB_ID"), id=run_id, resume="allow",
            dir=str(out), mode=mode, config={"run": run.to_json(), "deepspeed": ds_cfg})
        print(f"[bertscale] W&B {mode} ({why}); run id {run_id}"
              + (" (continuing the same run)" if resumed else ""), file=sys.stderr)

    def log(self, step: int, row: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **row}
        self.metrics_file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        self._show(step, row)

    def _show(self, step, row):
        if "eval" in row:
            msg = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            self._print(f"eval step {step}: {msg}")
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{row.get('loss', 0):.4f}", sps=f"{row.get('samples_per_s', 0):.1f}")
            self.bar.refresh()
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        self._print(f"step {step}/{self.total_steps} loss {row.get('loss', float('nan')):.4f} "
                    f"lr {row.get('lr', 0):.3g} {row.get('samples_per_s', 0):.1f} samples/s "
                    f"eta {eta / 60:.1f} min")

    def _print(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(f"[bertscale] {msg}", file=sys.stderr, flush=True)

    def summary(self, values: dict) -> None:
        if not self.active:
            return
        values = {**values, "total_time_s": time.time() - self.start}
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = v

    def finish(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


class Throughput:
    """Samples/s, real tokens/s, TFLOP/s and MFU over the interval since the last report."""

    def __init__(self, model_config, peak: float | None, world: int):
        self.config, self.peak, self.world = model_config, peak, world
        self.reset()

    def reset(self):
        self.t0, self.samples, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def add(self, batch) -> None:
        mask = batch["attention_mask"]
        real = int(mask.sum())
        self.samples += mask.shape[0]
        self.tokens += real
        self.flops += real * flops_per_token(self.config, mask.shape[1])

    def report(self) -> dict:
        dt = max(time.time() - self.t0, 1e-9)
        # Every rank does the same amount of work per step, so multiply rank 0's count by world.
        out = {"samples_per_s": self.samples * self.world / dt, "tokens_per_s": self.tokens * self.world / dt,
               "tflops_per_gpu": self.flops / dt / 1e12}
        if self.peak:
            out["mfu"] = out["tflops_per_gpu"] / self.peak
        self.reset()
        return out


class LossScaleWatchdog:
    """fp16 health: stop if the scale sits at its minimum or most recent steps were skipped."""

    def __init__(self, ds_cfg: dict, window: int = 50, max_skip_share: float = 0.5):
        fp16 = ds_cfg.get("fp16", {})
        self.enabled = bool(fp16.get("enabled"))
        self.min_scale = float(fp16.get("min_loss_scale", 1))
        self.window, self.max_skip_share = window, max_skip_share
        self.history: list[bool] = []

    def check(self, scale: float | None, skipped: bool) -> str | None:
        """Returns the error message when the run should stop, else None."""
        if not self.enabled:
            return None
        self.history = (self.history + [skipped])[-self.window:]
        skip_share = sum(self.history) / len(self.history)
        at_min = scale is not None and scale <= self.min_scale and skipped
        if at_min or (len(self.history) == self.window and skip_share > self.max_skip_share):
            why = (f"the fp16 loss scale fell to its minimum ({self.min_scale:g}) and steps still overflow"
                   if at_min else f"{skip_share:.0%} of the last {self.window} steps overflowed and were skipped")
            return (f"fp16 training is not learning: {why}. A checkpoint was saved. Use --bf16 if the GPU "
                    "supports it (A100/H100), or lower --learning-rate, or raise fp16.min_loss_scale.")
        return None

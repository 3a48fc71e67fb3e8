"""What a user sees: progress on rank 0, metrics.jsonl and W&B.

Only rank 0 writes. metrics.jsonl holds the same metric keys as W&B, plus the markers "eval" and
"summary" that say what kind of row it is, so runs compare without W&B (`bertscale report`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path

from .. import distributed as dist
from ..errors import first_line
from ..files import read_jsonl, write_text_atomic
from .redact import redact_secrets
from .wandb_run import wandb_mode

ROW_MARKERS = ("eval", "summary")  # say what a metrics.jsonl row is; not metrics, so not sent to W&B


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class Tracker:
    """Rank-0 sink for metrics. Other ranks get a tracker whose methods do nothing.

    start_step > 0 means a resumed run: rows logged after that step by the interrupted run are
    dropped from metrics.jsonl (they are logged again), and W&B continues the same run id.
    """

    def __init__(self, log, output_dir, config: dict, total_steps: int, start_step: int = 0):
        """`log`: the logging flags; `config`: what W&B shows as the run's config (secrets are redacted)."""
        self.active = dist.is_main()
        self.total_steps, self.start_step, self.step = total_steps, start_step, start_step
        self.wandb = None
        self.wandb_where = None
        self.bar = None
        self.start = time.time()
        self.train_rows: list[dict] = []
        if not self.active:
            return
        out = Path(output_dir)
        self.metrics_path = out / "metrics.jsonl"
        _keep_rows_up_to(self.metrics_path, start_step)
        self.metrics_file = open(self.metrics_path, "a", buffering=1)
        mode, why = wandb_mode(log.wandb_mode)
        if mode == "disabled":
            print(f"[bertscale] W&B disabled ({why}); metrics go to {self.metrics_path}", file=sys.stderr)
        else:
            self._start_wandb(log, config, mode, why, out, resumed=start_step > 0)
        if sys.stderr.isatty():
            from tqdm import tqdm

            # A pty may report a 0x0 size (e.g. `script`), and tqdm then draws nothing: assume 100x50.
            sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
                nrows=None if sized else 50,
            )
        self.loop_start = time.time()  # for the ETA: W&B's start-up is not training speed

    def _start_wandb(self, log, config: dict, mode, why, out: Path, resumed: bool):
        import wandb

        id_file = out / "wandb_run_id.txt"
        resumed = resumed and id_file.is_file()  # a restart from step 0 is a new W&B run
        run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:8]
        write_text_atomic(id_file, run_id + "\n")
        kwargs = dict(
            project=log.wandb_project,
            entity=log.wandb_entity,
            name=log.run_name or out.name,
            group=log.wandb_group or os.environ.get("SLURM_JOB_ID"),
            id=run_id,
            resume="allow",
            dir=str(out),
            config=redact_secrets(config),
        )
        try:
            self.wandb = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # a tracking outage must not cost the training run
            if mode != "online":
                raise
            print(
                f"[bertscale] W&B online start failed ({type(e).__name__}: {first_line(e)}); "
                "logging offline instead, upload later with `wandb sync`",
                file=sys.stderr,
            )
            mode, why = "offline", "online start failed"
            wandb.teardown()  # the failed online run still holds the run id in wandb's service
            self.wandb = wandb.init(mode=mode, **kwargs)
        self.wandb_where = self._where(mode)
        print(
            f"[bertscale] W&B {mode} ({why}); run id {run_id}"
            + (" (continuing the same run)" if resumed else "")
            + f"; {self.wandb_where}",
            file=sys.stderr,
            flush=True,
        )

    def _where(self, mode: str) -> str:
        """Where a person finds the W&B run: its page, or its offline folder and how to upload it."""
        if mode == "online" and getattr(self.wandb, "url", None):
            return self.wandb.url
        run_dir = Path(self.wandb.dir).parent  # .../wandb/offline-run-<time>-<id>/files
        return f"saved in {run_dir} (upload: wandb sync {run_dir})"

    def log(self, step: int, row: dict) -> None:
        if not self.active:
            return
        row = {"step": step, **row}
        self.step = max(self.step, step)
        self.metrics_file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step" and k not in ROW_MARKERS}, step=step)
        if "loss" in row and "eval" not in row:
            self.train_rows.append(row)
        self._show(step, row)

    def _show(self, step, row):
        if "eval" in row:
            msg = " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            self._print(f"eval step {step}: {msg}")
            return
        if "loss" not in row:
            return
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{row['loss']:.4f}",
                lr=f"{row.get('lr', 0):.3g}",
                samples_s=f"{row.get('samples_per_s', 0):.1f}",
                refresh=False,
            )
            self.bar.update(step - self.bar.n)
            if step >= self.total_steps:  # done: later lines (final eval, export) go below the bar
                self.bar.close()
                self.bar = None
            return
        elapsed = time.time() - self.loop_start
        eta = elapsed / max(step - self.start_step, 1) * (self.total_steps - step)
        self._print(
            f"step {step}/{self.total_steps} loss {row['loss']:.4f} lr {row.get('lr', 0):.3g} "
            f"{row.get('samples_per_s', 0):.1f} samples/s eta {_duration(eta)}"
        )

    def _print(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(f"[bertscale] {msg}", file=sys.stderr, flush=True)

    def summary(self, values: dict, final: str = "") -> None:
        """Final numbers: the caller's (final/best metrics, mean throughput) plus peak memory and
        total time; into the W&B summary, a "summary" row of metrics.jsonl and the printed end block.
        `final`: the block's first line (the chosen model's metrics), if any."""
        if not self.active:
            return
        values = {k: _finite(v) for k, v in values.items()}
        values.update(self._memory_summary())
        values["total_time_s"] = time.time() - self.start
        self.metrics_file.write(json.dumps({"step": self.step, "summary": 1, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if v is not None})
        units = (
            ("mean_samples_per_s", "{:.1f} samples/s"),
            ("mean_tokens_per_s", "{:.0f} tokens/s"),
            ("mean_tflops_per_gpu", "{:.3g} TFLOP/s per GPU"),
            ("mean_mfu", "MFU {:.1%}"),
        )
        speed = ", ".join(fmt.format(values[k]) for k, fmt in units if k in values)
        out = self.metrics_path.parent
        block = [
            final,
            f"speed: {speed or 'not measured'}; total time {_duration(values['total_time_s'])}",
            f"model: {out / 'final'}",
            f"metrics: {self.metrics_path}; plots: bertscale report {out}",
            f"W&B: {self.wandb_where}" if self.wandb_where else "",
        ]
        print("\n".join(f"[bertscale] {line}" for line in block if line), flush=True)

    def _memory_summary(self) -> dict:
        out = {}
        for key in ("mem_peak_gib", "mem_rss_peak_gib"):
            vals = [r[key] for r in self.train_rows if key in r]
            if vals:
                out[key] = max(vals)
        return out

    def finish(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without rows past `step` (and old summaries): a resumed run logs
    those steps again, so the file keeps one history. A torn last line is dropped too."""
    if not path.is_file():
        return
    kept = [
        row for _, row in read_jsonl(path, skip_bad_lines=True) if row.get("step", 0) <= step and "summary" not in row
    ]
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )

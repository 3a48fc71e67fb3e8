"""What a user sees: progress on rank 0, metrics.jsonl, W&B, throughput/MFU, memory, fp16 health.

Only rank 0 writes. metrics.jsonl holds the same metric keys as W&B, plus the markers "eval" and
"summary" that say what kind of row it is, so runs compare without W&B (`bertscale report`).
"""
from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from . import distributed as dist

# Dense 16-bit tensor-core peaks (TFLOP/s) for MFU, matched against the CUDA device name, most
# specific first; --peak-tflops overrides (and is the only source for other devices).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0), ("V100", 125.0), ("L40S", 362.0), ("L4", 121.0), ("A6000", 155.0))
ROW_MARKERS = ("eval", "summary")  # say what a metrics.jsonl row is; not metrics, so not sent to W&B
SECRET_NAME = re.compile(r"(^|_)(api_?key|token|secret|password|passwd|credentials?)($|_)")
REDACTED = "<redacted>"


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def non_embedding_params(config) -> int:
    """Weights and biases of a BERT encoder (what every token passes through): per layer the
    Q/K/V/output projections, the two FFN matmuls and two LayerNorms. Embeddings are lookups,
    and the pooler runs on one token per sequence, so neither is counted."""
    h, inter = config.hidden_size, config.intermediate_size
    attention = 4 * (h * h + h) + 2 * h
    ffn = (h * inter + inter) + (inter * h + h) + 2 * h
    return config.num_hidden_layers * (attention + ffn)


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter (forward 2, backward 4) plus the
    attention scores, 6 * layers * seq * hidden. The MLM decoder over the vocabulary is left out,
    so pretraining MFU reads a little low (about 10% for BERT-large)."""
    return 6 * non_embedding_params(config) + 6 * config.num_hidden_layers * seq_len * config.hidden_size


def memory_stats() -> dict:
    """Rank 0's memory: CUDA allocated/reserved/peak, or the process RSS and its peak on CPU."""
    import torch

    gib = 2 ** 30
    if torch.cuda.is_available():
        return {"mem_allocated_gib": torch.cuda.memory_allocated() / gib,
                "mem_reserved_gib": torch.cuda.memory_reserved() / gib,
                "mem_peak_gib": torch.cuda.max_memory_allocated() / gib}
    fields = {"VmRSS:": "mem_rss_gib", "VmHWM:": "mem_rss_peak_gib"}
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0] + ":"
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024 / gib  # the file says kB
    return out


def redact_secrets(obj, secrets: set[str] | None = None):
    """A copy of a config for W&B without credentials: values under secret-looking keys
    (api_key, token, password, ...) and any string holding a secret from the environment."""
    if secrets is None:
        secrets = {v for k, v in os.environ.items() if SECRET_NAME.search(k.lower()) and len(v) >= 8}
    if isinstance(obj, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k).lower()) and obj[k] not in (None, "", False)
                else redact_secrets(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, secrets) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> tuple[str, str]:
    """(mode, why): the flag, else WANDB_MODE, else online when an API key is configured."""
    if requested:
        return requested, f"--wandb-mode {requested}"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if _api_key_configured():
        return "online", "a W&B API key is configured"
    return "offline", "no W&B API key found; `wandb sync` uploads it later"


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class Tracker:
    """Rank-0 sink for metrics. Other ranks get a tracker whose methods do nothing.

    start_step > 0 means a resumed run: rows logged after that step by the interrupted run are
    dropped from metrics.jsonl (they are logged again), and W&B continues the same run id.
    """

    def __init__(self, run, ds_cfg: dict, total_steps: int, start_step: int = 0):
        self.active = dist.is_main()
        self.total_steps, self.start_step, self.step = total_steps, start_step, start_step
        self.wandb = None
        self.bar = None
        self.start = time.time()
        self.train_rows: list[dict] = []
        if not self.active:
            return
        out = Path(run.output_dir)
        self.metrics_path = out / "metrics.jsonl"
        _keep_rows_up_to(self.metrics_path, start_step)
        self.metrics_file = open(self.metrics_path, "a", buffering=1)
        mode, why = wandb_mode(run.wandb_mode)
        if mode == "disabled":
            print(f"[bertscale] W&B disabled ({why}); metrics go to {self.metrics_path}", file=sys.stderr)
        else:
            self._start_wandb(run, ds_cfg, mode, why, out, resumed=start_step > 0)
        if sys.stderr.isatty():
            from tqdm import tqdm

            # A pty may report a 0x0 size (e.g. `script`), and tqdm then draws nothing: assume 100x50.
            sized = min(os.get_terminal_size(sys.stderr.fileno())) > 0
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 50)
        self.loop_start = time.time()  # for the ETA: W&B's start-up is not training speed

    def _start_wandb(self, run, ds_cfg, mode, why, out: Path, resumed: bool):
        import wandb

        id_file = out / "wandb_run_id.txt"
        resumed = resumed and id_file.is_file()  # a restart from step 0 is a new W&B run
        run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        kwargs = dict(project=run.wandb_project, entity=run.wandb_entity, name=run.run_name or out.name,
                      group=run.wandb_group or os.environ.get("SLURM_JOB_ID"), id=run_id, resume="allow",
                      dir=str(out), config=redact_secrets({"run": run.to_json(), "deepspeed": ds_cfg,
                                             "world_size": dist.world_size()}))
        try:
            self.wandb = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # a tracking outage must not cost the training run
            if mode != "online":
                raise
            print(f"[bertscale] W&B online start failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  "logging offline instead, upload later with `wandb sync`", file=sys.stderr)
            mode, why = "offline", "online start failed"
            wandb.teardown()  # the failed online run still holds the run id in wandb's service
            self.wandb = wandb.init(mode=mode, **kwargs)
        print(f"[bertscale] W&B {mode} ({why}); run id {run_id}"
              + (" (continuing the same run)" if resumed else ""), file=sys.stderr, flush=True)

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
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row.get('samples_per_s', 0):.1f}",
                                 refresh=False)
            self.bar.update(step - self.bar.n)
            if step >= self.total_steps:  # done: later lines (final eval, export) go below the bar
                self.bar.close()
                self.bar = None
            return
        elapsed = time.time() - self.loop_start
        eta = elapsed / max(step - self.start_step, 1) * (self.total_steps - step)
        self._print(f"step {step}/{self.total_steps} loss {row['loss']:.4f} lr {row.get('lr', 0):.3g} "
                    f"{row.get('samples_per_s', 0):.1f} samples/s eta {_duration(eta)}")

    def _print(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(f"[bertscale] {msg}", file=sys.stderr, flush=True)

    def summary(self, values: dict) -> None:
        """Final numbers: the caller's (final/best metrics, mean throughput) plus peak memory and
        total time; into the W&B summary, a "summary" row of metrics.jsonl and one printed line."""
        if not self.active:
            return
        values = {k: _finite(v) for k, v in values.items()}
        values.update(self._memory_summary())
        values["total_time_s"] = time.time() - self.start
        self.metrics_file.write(json.dumps({"step": self.step, "summary": 1, **values}) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if v is not None})
        units = (("mean_samples_per_s", "{:.1f} samples/s"), ("mean_tokens_per_s", "{:.0f} tokens/s"),
                 ("mean_tflops_per_gpu", "{:.3g} TFLOP/s per GPU"), ("mean_mfu", "MFU {:.1%}"))
        speed = ", ".join(fmt.format(values[k]) for k, fmt in units if k in values)
        print(f"[bertscale] throughput: {speed or 'not measured'}; total time {_duration(values['total_time_s'])}",
              flush=True)

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
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step and "summary" not in row:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Throughput:
    """Samples/s, real (unpadded) tokens/s, TFLOP/s per GPU and MFU over the training time since
    the last report. Evaluation and checkpoint time is excluded (wrap it in `paused()`)."""

    def __init__(self, model_config, peak: float | None, world: int):
        self.config, self.peak, self.world = model_config, peak, world
        self._pause_depth = 0
        self._totals: list[list[float]] = []  # [samples, tokens, flops, seconds] of each report
        self.reset()

    def reset(self):
        self.t0, self.samples, self.tokens, self.flops = time.time(), 0, 0, 0.0

    def add(self, batch) -> None:
        mask = batch["attention_mask"]
        real = int(mask.sum())
        self.samples += mask.shape[0]
        self.tokens += real
        self.flops += real * flops_per_token(self.config, mask.shape[1])

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        self._pause_depth += 1
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0:  # nested pauses (a save inside an eval) count once
                self.t0 += time.time() - t

    def report(self) -> dict:
        """Call on every rank at the same step: the counts are summed over ranks (their batches
        differ in real tokens)."""
        dt = max(time.time() - self.t0, 1e-9)
        samples, tokens, flops = _sum_over_ranks([self.samples, self.tokens, self.flops])
        self._totals.append([samples, tokens, flops, dt])
        self.reset()
        return self._rates(samples, tokens, flops, dt)

    def _rates(self, samples, tokens, flops, dt) -> dict:
        out = {"samples_per_s": samples / dt, "tokens_per_s": tokens / dt,
               "tflops_per_gpu": flops / self.world / dt / 1e12}
        if self.peak:
            out["mfu"] = out["tflops_per_gpu"] / self.peak
        return out

    def summary(self) -> dict:
        """mean_* rates over the whole run: total work / total time (a mean of per-interval rates
        would overstate it, since short-sequence steps are fast). The first interval holds
        start-up (allocations, kernel selection) and is left out when there are others."""
        intervals = self._totals[1:] or self._totals
        if not intervals:
            return {}
        return {f"mean_{k}": v for k, v in self._rates(*(sum(column) for column in zip(*intervals))).items()}


def _sum_over_ranks(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if tdist.get_backend() == "nccl":
        t = t.cuda()
    tdist.all_reduce(t)
    return t.tolist()


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
        self.history = (self.history + [skipped])[-self.window:]
        skip_share = sum(self.history) / len(self.history)
        at_min = scale is not None and scale <= self.min_scale and skipped
        if at_min or (len(self.history) == self.window and skip_share > self.max_skip_share):
            why = (f"the fp16 loss scale fell to its minimum ({self.min_scale:g}) and steps still overflow"
                   if at_min else f"{skip_share:.0%} of the last {self.window} steps overflowed and were skipped")
            return (f"fp16 training is not learning: {why}. Use --bf16 if the GPU supports it (A100/H100), "
                    "or lower --learning-rate, or raise fp16.min_loss_scale in the DeepSpeed config.")
        return None

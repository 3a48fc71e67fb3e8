"""Training speed: samples/s, real tokens/s, TFLOP/s per GPU and MFU, from the FLOPs of a BERT step."""

from __future__ import annotations

import contextlib
import time

# Dense 16-bit tensor-core peaks (TFLOP/s) for MFU, matched against the CUDA device name, most
# specific first; --peak-tflops overrides (and is the only source for other devices).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("V100", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A6000", 155.0),
)


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
        out = {
            "samples_per_s": samples / dt,
            "tokens_per_s": tokens / dt,
            "tflops_per_gpu": flops / self.world / dt / 1e12,
        }
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

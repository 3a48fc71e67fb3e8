"""Tracking: W&B (read back with wandb's own .wandb reader), metrics.jsonl, progress output,
FLOPs/MFU, the fp16 watchdog's stop in a real run, and `bertscale report` of real runs.

Three real 2-rank runs are shared by the tests below (module fixtures): a fine-tune logged to W&B
offline, its resumption, and an fp16 run that blows up, launched on a pseudo-terminal.
"""

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bertscale import tracking
from bertscale.args import LogArgs
from bertscale.tracking import throughput

from conftest import LAUNCHER, ROOT, SQUAD, bertscale, bertscale_single, cpu_env, free_port, read_metrics

SECRET_WANDB_KEY = "bertscaleTestSecretKey0123456789abcdefghijklmnop"
SECRET_HF_TOKEN = "hf_bertscaleTestSecretToken0123456789"
SECRET_COMET_KEY = "bertscaleCometSecret987654321"
PEAK = 2.0  # --peak-tflops: makes MFU appear on CPU, where no device peak is known
W_AND_B_INTERNAL = ("_runtime", "_step", "_timestamp")


# --- unit tests --------------------------------------------------------------------------------


def test_flops_per_token_counts_a_real_bert_large():
    """The formula's parameter count is exactly the non-embedding parameters of a real BertModel
    with BERT-large dims (built on the meta device: no memory, no download)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=28996
    )
    with torch.device("meta"):
        encoder_only = BertModel(config, add_pooling_layer=False)
        with_pooler = BertModel(config)

    def non_embedding(model):
        return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embeddings."))

    n = tracking.non_embedding_params(config)
    assert n == non_embedding(encoder_only)
    assert 300e6 < n < 305e6  # the well-known ~302M of BERT-large's encoder
    assert abs(non_embedding(with_pooler) - n) / n < 0.005  # the pooler (one token per sequence) is noise
    assert tracking.flops_per_token(config, 384) == 6 * n + 6 * 24 * 384 * 1024
    # 6N dominates at seq 384 (attention adds 3%): about 1.87 GFLOP per trained token.
    assert 1.85e9 < tracking.flops_per_token(config, 384) < 1.9e9


def test_peak_tflops_override_and_cpu():
    assert tracking.peak_tflops(123.0) == 123.0
    import torch

    if not torch.cuda.is_available():
        assert tracking.peak_tflops(None) is None  # no MFU without a known peak


def test_throughput_excludes_paused_time():
    import torch
    from transformers import BertConfig

    speed = tracking.Throughput(BertConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=256), PEAK, 1)
    speed.add({"attention_mask": torch.tensor([[1] * 10 + [0] * 6] * 4)})
    with speed.paused():
        with speed.paused():  # nested: counted once
            time.sleep(0.3)
    out = speed.report()
    assert out["samples_per_s"] > 4 / 0.25  # the 0.3 s pause is not in the denominator
    assert out["tokens_per_s"] == pytest.approx(out["samples_per_s"] * 10)  # real tokens, not padding
    assert out["mfu"] == pytest.approx(out["tflops_per_gpu"] / PEAK)


def test_mean_throughput_is_total_work_over_total_time(monkeypatch):
    """A fast interval and a slow one of equal work: the mean is 2 x work / total time (the mean of
    the two rates would say more); the first interval (start-up) is left out."""
    import torch
    from transformers import BertConfig

    clock = [0.0]
    monkeypatch.setattr(throughput.time, "time", lambda: clock[0])
    speed = tracking.Throughput(BertConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=256), PEAK, 1)
    batch = {"attention_mask": torch.ones(8, 16, dtype=torch.long)}
    assert speed.summary() == {}
    for seconds in (100.0, 1.0, 3.0):  # start-up, fast, slow
        speed.add(batch)
        clock[0] += seconds
        speed.report()
    mean = speed.summary()
    assert mean["mean_samples_per_s"] == pytest.approx(16 / 4.0)  # not (8/1 + 8/3) / 2
    assert mean["mean_tokens_per_s"] == pytest.approx(16 * 16 / 4.0)
    assert mean["mean_mfu"] == pytest.approx(mean["mean_tflops_per_gpu"] / PEAK)


def test_redact_secrets():
    cfg = {
        "run": {"model": "tiny", "max_tokens": 5, "run_name": f"x-{SECRET_WANDB_KEY}"},
        "deepspeed": {
            "comet": {"enabled": False, "api_key": SECRET_COMET_KEY, "workspace": None},
            "optimizer": {"params": {"lr": 1e-3}},
        },
        "hf_token": "hf_abc",
        "list": [{"password": "pw"}],
    }
    out = tracking.redact_secrets(cfg, secrets={SECRET_WANDB_KEY})
    assert out["deepspeed"]["comet"] == {"enabled": False, "api_key": "<redacted>", "workspace": None}
    assert out["run"] == {"model": "tiny", "max_tokens": 5, "run_name": "<redacted>"}
    assert out["hf_token"] == "<redacted>" and out["list"] == [{"password": "<redacted>"}]
    assert out["deepspeed"]["optimizer"] == cfg["deepspeed"]["optimizer"]


def test_wandb_mode_choice(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode(None)[0] == "offline"
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {SECRET_WANDB_KEY}\n")
    assert tracking.wandb_mode(None) == ("online", "a W&B API key is configured")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another server
    assert tracking.wandb_mode(None)[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", SECRET_WANDB_KEY)
    assert tracking.wandb_mode(None)[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode(None)[0] == "disabled"
    assert tracking.wandb_mode("offline") == ("offline", "--wandb-mode offline")


def test_resumed_tracker_drops_rows_after_the_checkpoint(tmp_path):
    """A run that crashed after step 6 resumes from its step-4 checkpoint: steps 5-6 are logged
    again, so the old ones (and a torn last line) leave metrics.jsonl."""
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6)] + [{"step": 4, "eval": 1, "eval_f1": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')
    tracker = tracking.Tracker(LogArgs(wandb_mode="disabled"), tmp_path, {}, 10, start_step=4)
    tracker.log(6, {"loss": 0.5})
    tracker.summary({"best_metric": 3.0})
    tracker.finish()
    got = read_metrics(tmp_path)
    assert [(r["step"], "loss" in r, "summary" in r) for r in got] == [
        (2, True, False),
        (4, True, False),
        (4, False, False),
        (6, True, False),
        (6, False, True),
    ]
    assert got[3]["loss"] == 0.5 and got[-1]["best_metric"] == 3.0


# --- real runs ---------------------------------------------------------------------------------


def finetune_args(out: Path, ds_config: Path, max_steps: int) -> list[str]:
    return [
        "finetune",
        "--task",
        "squad",
        "--model",
        "tiny",
        "--train-file",
        str(SQUAD / "train-v1.1-first44.json"),
        "--eval-file",
        str(SQUAD / "dev-v1.1-part1.json"),
        "--max-train-samples",
        "120",
        "--max-eval-samples",
        "40",
        "--max-seq-length",
        "192",
        "--doc-stride",
        "64",
        "--micro-batch-size",
        "8",
        "--max-steps",
        str(max_steps),
        "--log-every",
        "2",
        "--eval-every",
        "4",
        "--save-every",
        "4",
        "--learning-rate",
        "1e-3",
        "--peak-tflops",
        str(PEAK),
        "--ds-config",
        str(ds_config),
        "--output-dir",
        str(out),
        "--run-name",
        "obs-main",
        "--wandb-group",
        "obs-group",
    ]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """8 steps logged to W&B offline, then resumed to step 12 (same W&B run id). The environment
    and the DeepSpeed config hold secrets that must not reach W&B."""
    tmp = tmp_path_factory.mktemp("obs")
    ds_config = tmp / "zero2_comet.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["comet"] = {"enabled": False, "api_key": SECRET_COMET_KEY}  # a real DeepSpeed key holding a secret
    ds_config.write_text(json.dumps(cfg))
    out = tmp / "squad-run"
    env = cpu_env(WANDB_MODE="offline", WANDB_API_KEY=SECRET_WANDB_KEY, HF_TOKEN=SECRET_HF_TOKEN)
    first = bertscale(finetune_args(out, ds_config, 8) + ["--overwrite-output-dir"], env=env)
    first_metrics = read_metrics(out)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    resumed = bertscale(finetune_args(out, ds_config, 12), env=env)
    return {"out": out, "first": first, "first_metrics": first_metrics, "run_id": run_id, "resumed": resumed}


def wandb_records(run_dir: Path) -> list[dict]:
    """The records of a run's .wandb transaction log, decoded by wandb itself (`wandb leet inspect`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def wandb_segments(main_run) -> list[list[dict]]:
    """Records of each offline W&B run dir of the main run (one per launch), oldest first."""
    return [wandb_records(d) for d in sorted((main_run["out"] / "wandb").glob("offline-run-*"))]


def merged_summary(records) -> dict:
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def metrics_by_step(rows) -> dict[int, dict]:
    """metrics.jsonl rows merged per step, markers dropped: what W&B holds as one history row."""
    merged = {}
    for r in rows:
        if "summary" not in r:
            merged.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k not in ("step", "eval")})
    return merged


@pytest.mark.slow
def test_wandb_config_holds_run_and_deepspeed_without_secrets(main_run, wandb_segments):
    out = main_run["out"]
    run_record = next(r["run"] for r in wandb_segments[0] if r["type"] == "run")
    config = run_record["config"]["update"]
    assert config["run"]["model"] == "tiny" and config["run"]["max_seq_length"] == 192
    assert config["run"]["learning_rate"] == 1e-3 and config["run"]["output_dir"] == str(out)
    assert config["deepspeed"]["zero_optimization"]["stage"] == 2
    assert config["deepspeed"]["train_batch_size"] == 16  # "auto" resolved: micro 8 x 2 ranks
    assert config["deepspeed"]["comet"]["api_key"] == "<redacted>"
    assert config["world_size"] == 2
    assert run_record["display_name"] == "obs-main" and run_record["run_group"] == "obs-group"
    for path in (out / "wandb").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (SECRET_WANDB_KEY, SECRET_HF_TOKEN, SECRET_COMET_KEY):
                assert secret.encode() not in data, f"{secret} leaked into {path}"


@pytest.mark.slow
def test_wandb_history_matches_metrics_jsonl(main_run, wandb_segments):
    """Same steps, same keys, same values in W&B (first segment) and metrics.jsonl."""
    records = wandb_segments[0]
    history = {
        r["history"]["step"]["num"]: {
            k: v for k, v in r["history"]["item"].items() if k not in W_AND_B_INTERNAL and not k.startswith("_wandb")
        }
        for r in records
        if r["type"] == "history"
    }
    jsonl = metrics_by_step(main_run["first_metrics"])
    assert sorted(history) == sorted(jsonl) == [2, 4, 6, 8]
    for step, row in jsonl.items():
        assert set(history[step]) == set(row), step
        for key, value in row.items():
            assert history[step][key] == pytest.approx(value, rel=1e-9), (step, key)
    logged = history[4]
    for key in (
        "loss",
        "lr",
        "skipped_steps",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "tflops_per_gpu",
        "mfu",
        "mem_rss_gib",
        "eval_exact_match",
        "eval_f1",
        "eval_seconds",
        "eval_examples_per_s",
    ):
        assert key in logged, key
    assert logged["eval_examples_per_s"] * logged["eval_seconds"] == pytest.approx(40)  # questions, not windows
    assert "loss_scale" not in logged  # fp32 run: no loss scale to report
    assert logged["mfu"] == pytest.approx(logged["tflops_per_gpu"] / PEAK)
    assert logged["tokens_per_s"] > logged["samples_per_s"] > 0


@pytest.mark.slow
def test_wandb_summary_has_final_best_throughput_and_time(main_run, wandb_segments):
    records = wandb_segments[0]
    summary = merged_summary(records)
    jsonl_summary = [r for r in main_run["first_metrics"] if "summary" in r]
    assert len(jsonl_summary) == 1 and jsonl_summary[0]["step"] == 8
    for key in (
        "final_f1",
        "final_exact_match",
        "best_metric",
        "steps",
        "total_time_s",
        "mean_samples_per_s",
        "mean_tokens_per_s",
        "mean_tflops_per_gpu",
        "mean_mfu",
        "mem_rss_peak_gib",
    ):
        assert summary[key] == pytest.approx(jsonl_summary[0][key], rel=1e-9), key
    assert summary["steps"] == 8 and summary["total_time_s"] > 0
    assert next(r for r in records if r["type"] == "exit")["exit"].get("exit_code", 0) == 0
    assert "[bertscale] speed: " in main_run["first"].stdout


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(main_run, wandb_segments):
    out, resumed, segments = main_run["out"], main_run["resumed"], wandb_segments
    assert (out / "wandb_run_id.txt").read_text().strip() == main_run["run_id"]
    assert f"run id {main_run['run_id']} (continuing the same run)" in resumed.stderr
    assert len(segments) == 2  # offline: one directory per launch, one run id
    ids = {next(r["run"]["run_id"] for r in seg if r["type"] == "run") for seg in segments}
    assert ids == {main_run["run_id"]}
    second = sorted(r["history"]["step"]["num"] for r in segments[1] if r["type"] == "history")
    assert second == [10, 12]
    assert merged_summary(segments[1])["steps"] == 12
    rows = read_metrics(out)
    train_steps = [r["step"] for r in rows if "loss" in r and "eval" not in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]  # one history: no duplicates across the resume
    assert [r["step"] for r in rows if "summary" in r] == [12]
    assert rows[: len(main_run["first_metrics"]) - 1] == main_run["first_metrics"][:-1]  # the first run's rows stay


@pytest.mark.slow
def test_plain_progress_lines_when_not_a_terminal(main_run):
    err = main_run["first"].stderr
    assert "W&B offline (WANDB_MODE)" in err and err.count("[bertscale] W&B ") == 1
    lines = re.findall(r"\[bertscale\] step (\d+)/8 loss [\d.]+ lr \S+ [\d.]+ samples/s eta \d+:\d\d", err)
    assert lines == ["2", "4", "6", "8"]
    assert re.search(r"\[bertscale\] eval step 4: eval_exact_match=\S+ eval_f1=\S+", err)
    assert "train:" not in err  # no tqdm bar in a log file


def run_on_terminal(cmd: list[str], env: dict, timeout: int = 600) -> tuple[int, str]:
    """Run cmd with stdout and stderr on a pseudo-terminal (like an interactive shell)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{cmd} ran past {timeout} s")
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def watchdog_run(tmp_path_factory):
    """fp16 (CPU fixture) with the loss scale starting at its minimum and an absurd lr: the weights
    blow up, fp16 overflows, and there is no scale left to back off. hysteresis 1 means DeepSpeed
    itself would raise at the first overflow, unless the watchdog takes that decision over."""
    tmp = tmp_path_factory.mktemp("obs_fp16")
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["fp16"].update(initial_scale_power=0, min_loss_scale=1, hysteresis=1)
    (tmp / "fp16_min_scale.json").write_text(json.dumps(cfg))
    out = tmp / "fp16-run"
    args = [
        "finetune",
        "--task",
        "squad",
        "--model",
        "tiny",
        "--train-file",
        str(SQUAD / "train-v1.1-first44.json"),
        "--eval-file",
        str(SQUAD / "dev-v1.1-part1.json"),
        "--max-train-samples",
        "100",
        "--max-eval-samples",
        "20",
        "--max-seq-length",
        "128",
        "--doc-stride",
        "32",
        "--micro-batch-size",
        "4",
        "--max-steps",
        "10",
        "--log-every",
        "5",
        "--warmup-ratio",
        "0",
        "--learning-rate",
        "1e4",
        "--fp16",
        "--ds-config",
        str(tmp / "fp16_min_scale.json"),
        "--wandb-mode",
        "disabled",
        "--output-dir",
        str(out),
        "--overwrite-output-dir",
    ]
    cmd = [*LAUNCHER, "--num_gpus", "2", "--master_port", str(free_port()), "bertscale/cli.py", *args]
    rc, text = run_on_terminal(cmd, cpu_env(fp16=True))
    return {"out": out, "rc": rc, "text": text}


@pytest.mark.slow
def test_watchdog_stops_collapsed_fp16_after_a_checkpoint(watchdog_run):
    text, out = watchdog_run["text"], watchdog_run["out"]
    assert watchdog_run["rc"] == 2, text[-3000:]
    errors = re.findall(r"bertscale: error: (.*)", text)
    assert len(errors) == 1, errors  # one message, from rank 0 only
    assert errors[0].startswith(
        "fp16 training is not learning: the fp16 loss scale fell to its minimum (1) "
        "and steps still overflow. Use --bf16"
    )
    assert "lower --learning-rate" in errors[0]
    saved = Path(re.search(r"checkpointed first: (\S+)", errors[0]).group(1).strip())
    assert saved.parent == out / "checkpoints" and (saved / "trainer_state.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == saved.name
    assert "Traceback" not in text and "already at minimum" not in text
    last = [r for r in read_metrics(out) if "loss" in r][-1]
    assert last["loss_scale"] == 1.0 and last["skipped_steps"] >= 1
    assert last["step"] == int(saved.name.split("-")[1])


@pytest.mark.slow
def test_progress_bar_on_a_terminal(watchdog_run):
    text = watchdog_run["text"]
    assert re.search(r"train: +\d+%\|.*\| *\d+/10 \[", text), text[-3000:]  # tqdm: step/total, then ETA
    assert "samples_s=" in text and "loss=" in text
    assert "[bertscale] step " not in text  # no plain lines when a bar is drawn
    assert text.count("[bertscale] W&B disabled") == 1


@pytest.mark.slow
def test_report_overlays_runs(main_run, watchdog_run, tmp_path):
    proc = bertscale_single(["report", str(main_run["out"]), str(watchdog_run["out"]), "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = proc.stdout.split()
    names = {Path(p).name for p in written}
    assert {"loss.png", "lr.png", "loss_scale.png", "throughput.png", "memory.png", "eval.png"} == names
    for p in written:
        data = Path(p).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, p


@pytest.mark.gpu
def test_gpu_memory_and_peak():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.ones(2**20, device="cuda")
    stats = tracking.memory_stats()
    assert stats["mem_peak_gib"] >= 4 / 1024 and stats["mem_reserved_gib"] >= stats["mem_allocated_gib"]
    name = torch.cuda.get_device_name()
    if any(k in name for k, _ in tracking.PEAK_TFLOPS):
        assert tracking.peak_tflops(None) > 100


@pytest.mark.slow
def test_wandb_online_start_failure_falls_back_to_offline(tmp_path):
    """A configured API key but no reachable W&B server (compute nodes often have no internet):
    training goes on, logged offline under the same run id for a later `wandb sync`."""
    env = cpu_env(WANDB_API_KEY=SECRET_WANDB_KEY, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="5")
    del env["WANDB_MODE"]
    proc = subprocess.run(
        [sys.executable, "tests/workers/obs_tracker.py", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = re.search(r"RUN_ID (\w+)", proc.stdout).group(1)
    assert "[bertscale] W&B online start failed (" in proc.stderr
    assert f"[bertscale] W&B offline (online start failed); run id {run_id}" in proc.stderr
    assert (tmp_path / "wandb_run_id.txt").read_text().strip() == run_id
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4, 4]  # two rows and the summary

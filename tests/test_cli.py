"""The CLI starts every way users start it, and bad input ends in one line + exit 2."""

import json
import subprocess
import sys

import pytest

from conftest import DEEPSPEED, ROOT, SQUAD, bertscale_single, cpu_env, free_port

COMMANDS = ["finetune", "pretrain", "prepare", "evaluate", "predict", "export", "plan", "report"]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300, **kw)


def test_help_every_way():
    assert "finetune" in run([sys.executable, "-m", "bertscale", "--help"]).stdout
    assert "finetune" in run([str(DEEPSPEED.parent / "bertscale"), "--help"]).stdout
    # the deepspeed launcher puts --local_rank before the subcommand
    out = run([sys.executable, "bertscale/cli.py", "--local_rank=0", "finetune", "--help"]).stdout
    assert "--learning-rate" in out and "[default: 3e-05]" in out


@pytest.mark.slow
def test_help_under_deepspeed_launcher():
    proc = run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "bertscale/cli.py", "--help"])
    assert proc.returncode == 0 and proc.stdout.count("Commands:") == 2  # both ranks


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_documented_with_default(command, monkeypatch):
    import click
    from click.testing import CliRunner

    from bertscale import console
    from bertscale.cli import main

    cmd = main.commands[command]
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{command} {param.opts}: no help"
    monkeypatch.setattr(console, "setup", lambda *a: None)  # in-process: leave pytest's warnings alone
    out = CliRunner().invoke(main, [command, "--help"], catch_exceptions=False).output
    assert "[default:" in out or command in ("report", "export")  # export: only required flags


def test_env_var_prefix(tmp_path):
    env = cpu_env(BERTSCALE_DS_CONFIG=str(tmp_path / "missing.json"))
    proc = subprocess.run(
        [sys.executable, "-m", "bertscale", "finetune", "--model", "tiny", "--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("bertscale: error: --ds-config")
    assert "missing.json" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_config_exits_2_with_one_line_and_no_output(tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["zero_optimization"]["stagee"] = 2
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    proc = bertscale_single(
        [
            "finetune",
            "--model",
            "tiny",
            "--train-file",
            str(SQUAD / "train-v1.1-first44.json"),
            "--ds-config",
            str(path),
            "--output-dir",
            str(out),
        ]
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bertscale: error")]
    assert errors == [
        f"bertscale: error: {path}: unknown key 'zero_optimization.stagee'; did you mean 'zero_optimization.stage'?"
    ]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_missing_model_is_one_clear_line(tmp_path):
    proc = bertscale_single(
        [
            "finetune",
            "--model",
            str(tmp_path / "no-such-model"),
            "--train-file",
            str(SQUAD / "train-v1.1-first44.json"),
            "--output-dir",
            str(tmp_path / "o"),
        ],
        env=cpu_env(HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--model" in proc.stderr and "no-such-model" in proc.stderr

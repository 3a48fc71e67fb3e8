"""Real DeepSpeed engines on CPU, 2 gloo ranks: the presets (single_node: ZeRO-1 in 16 bits, ZeRO-0 in
fp32; ZeRO-2/3) x bf16/fp16/fp32 take steps and learn, with the unpadded model."""

import json

import pytest

from conftest import FP16_FIXTURE, cpu_env, launch

pytestmark = pytest.mark.slow


def steps_of(proc):
    return [json.loads(line.split("STEP ", 1)[1]) for line in proc.stdout.splitlines() if "STEP " in line]


ENGINES = [
    ("zero2", "bf16", "torch.bfloat16"),
    ("zero3", "bf16", "torch.bfloat16"),
    ("zero3", "fp32", "torch.float32"),
    ("single_node", "bf16", "torch.bfloat16"),
    ("single_node", "fp32", "torch.float32"),
]


def stage(ds_config: str, precision: str) -> int:
    return {"zero2": 2, "zero3": 3}.get(ds_config, 0 if precision == "fp32" else 1)  # single_node: "auto"


@pytest.fixture(scope="module")
def engine_steps() -> list[dict]:
    """12 steps of each engine in ENGINES, all from one launch."""
    return steps_of(launch(["tests/workers/engine_steps.py", "12", *(f"{z}:{p}" for z, p, _ in ENGINES)]))


@pytest.mark.parametrize("ds_config,precision,dtype", ENGINES)
def test_engine_steps_and_loss_falls(engine_steps, ds_config, precision, dtype):
    rows = [r for r in engine_steps if r["combo"] == f"{ds_config}:{precision}"]
    assert len(rows) == 12
    assert rows[0]["zero"] == stage(ds_config, precision) and rows[0]["dtype"] == dtype
    assert rows[0]["model"] == "UnpaddedBertForQuestionAnswering"  # --unpad is the default
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], [r["loss"] for r in rows]
    if stage(ds_config, precision) < 3 and precision == "bf16":  # bf16.check_grad_overflow false reached ZeRO-1/2
        assert rows[0]["check_grad_overflow"] is False, rows[0]


def test_single_node_preset_is_zero1_with_fused_adam_in_16_bits_and_fused_adam_alone_in_fp32(engine_steps):
    row = next(r for r in engine_steps if r["combo"] == "single_node:bf16")
    assert (row["optimizer"], row["basic_optimizer"]) == ("DeepSpeedZeroOptimizer", "FusedAdam"), row
    row = next(r for r in engine_steps if r["combo"] == "single_node:fp32")  # steps the module's own weights
    assert (row["optimizer"], row["basic_optimizer"]) == ("FusedAdam", "FusedAdam"), row


def test_the_engines_of_a_process_ask_py_cpuinfo_once(engine_steps):
    """Loading DeepSpeed's CPU fused Adam asks py-cpuinfo for the CPU's flags twice, each time in a
    new Python process (~1 s); op_builds (from dist.setup) keeps the answer, so the process spawns it once."""
    assert {r["cpuinfo_spawns"] for r in engine_steps} == {1}, [r["cpuinfo_spawns"] for r in engine_steps[::12]]


def test_fp16_dynamic_loss_scale_backs_off(tmp_path):
    """fp16 with an initial scale of 2^24: the first steps overflow, are skipped, and the scale halves
    each time until steps go through and the loss falls (DeepSpeed's real loss scaler, CPU fixture)."""
    cfg = json.loads((FP16_FIXTURE.parents[2] / "ds_configs" / "zero2.json").read_text())
    cfg["fp16"].update(initial_scale_power=24, hysteresis=1)
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(cfg))
    rows = steps_of(launch(["tests/workers/engine_steps.py", "20", f"{path}:fp16"], env=cpu_env(fp16=True)))
    assert rows[0]["dtype"] == "torch.float16"
    scales = [r["scale"] for r in rows]
    assert scales[0] <= 2.0**23, scales  # the first step overflowed and halved the scale
    assert all(b <= a for a, b in zip(scales, scales[1:])), scales  # only backs off (window 1000)
    assert rows[-1]["skipped"] >= 1 and rows[-1]["skipped"] < 16
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], [r["loss"] for r in rows]


def test_fp16_refused_on_cpu_without_fixture():
    """DeepSpeed's CPU accelerator does fp16 only where oneDNN has fp16 kernels (AVX512-FP16/AMX-FP16
    CPUs); elsewhere bertscale refuses it with one clear line instead of DeepSpeed's traceback."""
    import torch

    proc = launch(["tests/workers/engine_steps.py", "1", "zero2:fp16"], check=False)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():  # this CPU runs fp16: the run must just work
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert '"dtype": "torch.float16"' in proc.stdout
    else:
        assert proc.returncode != 0
        assert "cannot train in fp16; use --bf16 or --fp32 instead" in proc.stdout + proc.stderr

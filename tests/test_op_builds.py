"""op_builds: a first run says that DeepSpeed is building an op (a minute or more of silence
otherwise); an op already built, or another local rank, says nothing. The compile itself is
DeepSpeed's and is not rerun here (45 s): a recorder stands in for it, the builder and torch's
build folders are real. (That py-cpuinfo is asked once: test_engine.py, in real engines.)"""

from pathlib import Path

import pytest
from deepspeed.ops.op_builder.builder import OpBuilder
from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

from bertscale import op_builds


@pytest.fixture
def builds(monkeypatch, tmp_path):
    """DeepSpeed's jit_load replaced by a recorder (announce_builds then wraps it), in an empty
    build folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: calls.append(self.name) or "module")
    return calls


def test_an_op_not_built_yet_is_announced_once_per_build(builds, capfd):
    op_builds.announce_builds(say=True)
    assert FusedAdamBuilder().jit_load() == "module" and builds == ["fused_adam"]
    err = capfd.readouterr().err
    assert "[bertscale] building DeepSpeed's fused_adam op for this machine, once, into " in err
    assert err.count("\n") == 1


def test_other_local_ranks_build_without_a_word(builds, capfd):
    op_builds.announce_builds(say=False)
    assert FusedAdamBuilder().jit_load() == "module" and builds == ["fused_adam"]
    assert capfd.readouterr().err == ""


def test_a_built_op_is_loaded_without_a_word(builds, capfd):
    op_builds.announce_builds(say=True)
    folder = op_builds.unbuilt("fused_adam")
    assert folder is not None
    (Path(folder) / "fused_adam.so").write_bytes(b"")
    assert op_builds.unbuilt("fused_adam") is None
    FusedAdamBuilder().jit_load()
    assert capfd.readouterr().err == "" and builds == ["fused_adam"]


def test_announce_wraps_once(builds):
    op_builds.announce_builds(say=True)
    wrapped = OpBuilder.jit_load
    op_builds.announce_builds(say=True)
    assert OpBuilder.jit_load is wrapped

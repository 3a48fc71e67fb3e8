"""Export: consolidate a (ZeRO-2/3) checkpoint, or its universal conversion (step-N/universal), into a
Hugging Face model directory (fp32 weights, config, tokenizer) that `from_pretrained` loads."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from .. import console
from ..errors import UserError
from .safe_load import safe_load
from .save import latest
from .universal import is_universal
from .universal import state_dict as universal_state_dict


def consolidated_state_dict(ckpt: Path) -> dict:
    """fp32 weights gathered from all ZeRO partitions (or the plain module for stage 0, or the
    per-parameter files of a universal checkpoint)."""
    ckpt = Path(ckpt)
    if is_universal(ckpt):
        return universal_state_dict(ckpt)
    if any(ckpt.glob("*optim_states.pt")) and any(ckpt.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # DeepSpeed's consolidation unpickles with weights_only=False: open every file safely first
        # (memory-mapped, so cheap), so a checkpoint with foreign objects is refused before that.
        for f in ckpt.glob("*.pt"):
            safe_load(f, map_location="cpu", mmap=zipfile.is_zipfile(f))
        with console.quiet_output():  # its "Processing zero checkpoint ..." lines and progress bars
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    module_file = ckpt / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise UserError(f"{ckpt}: no DeepSpeed model states found")
    return {k: v.float() for k, v in safe_load(module_file, map_location="cpu")["module"].items()}


def export(ckpt, output) -> Path:
    """Write a Hugging Face model dir (fp32 weights, config, tokenizer) from any checkpoint."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    ckpt, output = Path(ckpt), Path(output)
    if (ckpt / "checkpoints").is_dir():
        ckpt = latest(ckpt) or ckpt
    hf = (ckpt.parent if is_universal(ckpt) else ckpt) / "hf"  # a conversion's config is its checkpoint's
    if not hf.is_dir():
        raise UserError(
            f"--checkpoint {ckpt}: not a bertscale checkpoint (no hf/ folder); "
            "pass OUTPUT_DIR/checkpoints/step-N (or its universal/ folder) or an output dir"
        )
    config = AutoConfig.from_pretrained(hf)
    model_cls = getattr(transformers, config.architectures[0])
    state = consolidated_state_dict(ckpt)
    model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    # Tied MLM decoder weights are stored once, under the word embeddings.
    untied = {k for k in missing if not ("decoder" in k or k.endswith("predictions.bias"))}
    if unexpected or untied:
        raise UserError(
            f"{ckpt}: weights do not match {config.architectures[0]} "
            f"(missing {sorted(untied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with console.quiet_output():  # transformers' "Writing model shards" progress bar
        model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(hf).save_pretrained(tmp)
    if output.exists():
        shutil.rmtree(output)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes 0600; teammates on a shared cluster must read it
        os.chmod(f, 0o666 & ~umask)
    os.rename(tmp, output)
    return output

"""Build or load BERT models and tokenizers: hub ids, local dirs, and the `tiny` preset."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UserError, first_line

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
# 2 layers, hidden 128: fast enough for 2-rank CPU tests, same code path as BERT-large.
TINY_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
    type_vocab_size=2,
)


RANDOM_PREFIX = "random:"  # random:DIR_OR_HUB_ID = that architecture and tokenizer, fresh weights


def is_tiny(name: str) -> bool:
    return name == "tiny"


def _source(name) -> str:
    name = str(name)
    return name[len(RANDOM_PREFIX) :] if name.startswith(RANDOM_PREFIX) else name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer, BertTokenizer

    if is_tiny(name):
        return BertTokenizer.from_pretrained(str(TINY_DIR), do_lower_case=True, model_max_length=512)
    try:
        return AutoTokenizer.from_pretrained(_source(name))
    except (OSError, ValueError) as e:
        raise UserError(_missing(name, e)) from None


def load_config(name: str, **overrides):
    from transformers import AutoConfig, BertConfig

    if is_tiny(name):
        return BertConfig(vocab_size=_tiny_vocab_size(), **TINY_CONFIG, **overrides)
    try:
        return AutoConfig.from_pretrained(_source(name), **overrides)
    except (OSError, ValueError) as e:
        raise UserError(_missing(name, e)) from None


def build_model(name: str, model_class, **overrides):
    """Random init for `tiny` and `random:...`, pretrained weights otherwise (missing heads are created).

    Under ZeRO-3 the caller keeps a transformers HfDeepSpeedConfig alive, which makes both
    from_pretrained and _from_config partition weights as they are created.
    """
    name = str(name)
    config = load_config(name, **overrides)
    config._attn_implementation = "sdpa"
    if is_tiny(name) or name.startswith(RANDOM_PREFIX):
        return model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    try:
        # A classifier head with another label count is re-initialised, as users expect.
        model, info = model_class.from_pretrained(
            name, config=config, ignore_mismatched_sizes="num_labels" in overrides, output_loading_info=True
        )
    except (OSError, ValueError) as e:
        raise UserError(_missing(name, e)) from None
    _say_what_is_new(name, info)
    return model


def _say_what_is_new(name: str, info: dict) -> None:
    """transformers' load report, in one line on rank 0: the weights this task adds (trained from
    scratch) and, with --verbose, the checkpoint's weights it leaves out (e.g. the pooler)."""
    from . import console, distributed

    if not distributed.is_main():
        return
    mismatched = (k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ()))
    new = _modules(info.get("missing_keys", ())) + _modules(mismatched)
    if new:
        print(
            f"[bertscale] {', '.join(new)}: new (not in the pretrained model), trained from scratch on this task",
            file=sys.stderr,
            flush=True,
        )
    unused = _modules(info.get("unexpected_keys", ()))
    if unused and console.verbose():
        print(f"[bertscale] unused weights of {name}: {', '.join(unused)}", file=sys.stderr)


def _modules(keys) -> list[str]:
    """'qa_outputs.weight', 'qa_outputs.bias' -> ['qa_outputs']."""
    return sorted({k.rsplit(".", 1)[0] for k in keys})


def _tiny_vocab_size() -> int:
    with open(TINY_DIR / "vocab.txt", encoding="utf-8") as f:
        return sum(1 for _ in f)


def _missing(name: str, err: Exception) -> str:
    if os.path.isdir(name):
        return f"--model {name}: cannot load a model from this directory ({first_line(err)})"
    return (
        f"--model {name}: not a local directory, and the hub has no such model or is unreachable "
        f"({first_line(err)}). Pass a hub id, a local model directory, 'tiny', or "
        "random:<dir or hub id> for fresh weights."
    )


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing per layer, under either transformers name for it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

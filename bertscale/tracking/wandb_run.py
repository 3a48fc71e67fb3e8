"""Which W&B mode a run uses, and why (the flag, WANDB_MODE, or whether an API key is configured)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit


def _api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> tuple[str, str]:
    """(mode, why): the flag, else WANDB_MODE, else online when an API key is configured."""
    if requested:
        return requested, f"--wandb-mode {requested}"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if _api_key_configured():
        return "online", "a W&B API key is configured"
    return "offline", "no W&B API key found; `wandb sync` uploads it later"

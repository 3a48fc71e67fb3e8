"""Credentials stay out of W&B and run_config.json: secret-looking keys and values are replaced."""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"(^|_)(api_?key|token|secret|password|passwd|credentials?)($|_)")
REDACTED = "<redacted>"


def redact_secrets(obj, secrets: set[str] | None = None):
    """A copy of a config for W&B without credentials: values under secret-looking keys
    (api_key, token, password, ...) and any string holding a secret from the environment."""
    if secrets is None:
        secrets = {v for k, v in os.environ.items() if SECRET_NAME.search(k.lower()) and len(v) >= 8}
    if isinstance(obj, dict):
        return {
            k: REDACTED
            if SECRET_NAME.search(str(k).lower()) and obj[k] not in (None, "", False)
            else redact_secrets(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v, secrets) for v in obj]
    if isinstance(obj, str) and any(s in obj for s in secrets):
        return REDACTED
    return obj

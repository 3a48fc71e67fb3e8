"""Small file helpers every module shares: atomic writes and JSON-lines reading.

A reader (a resumed run, `bertscale report`, another rank) must never see half a file, so every
file that outlives a step is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path, text: str) -> None:
    """Write via a temp file + rename: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def copy_atomic(src, dst) -> None:
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.write_bytes(Path(src).read_bytes())
    os.replace(tmp, dst)


class BadJsonLine(ValueError):
    def __init__(self, path, line: int, msg: str):
        super().__init__(f"{path}, line {line}: not valid JSON ({msg})")
        self.line, self.msg = line, msg


def read_jsonl(path, *, skip_bad_lines: bool = False):
    """(line number, row) of every non-blank line. A bad line raises BadJsonLine unless
    `skip_bad_lines` (a torn last line after a crash is expected there)."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                if not skip_bad_lines:
                    raise BadJsonLine(path, number, e.msg) from None

"""Atomic file writes (every file lands under its real name complete, or not at all) and checked JSON reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .modeling_dtgma import atomic_path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it onto `path` (creating its folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """`write_text_atomic` of `payload` as indented JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON in `path`. A missing, unreadable, truncated or corrupted file is a `ValueError` that names the file
    and ends with `fix` (what to do about it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is missing or not valid JSON ({error}): {fix}") from error

"""Reading one field of a Hugging Face config.json, checked where it enters (shared by the family readers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError


def positive_int(hf: dict[str, Any], key: str, source: Path, default: int | None = None) -> int:
    """hf[key] (or default) as a positive integer, or one sentence naming the file and the field."""
    v = hf.get(key, default)
    if v is None:
        raise LlmxError(f"{source}: field `{key}` is missing; add it to config.json.")
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LlmxError(f"{source}: field `{key}` must be a positive integer, got {v!r}.")
    return v

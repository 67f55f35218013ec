"""JSON in and out: what llmx writes never holds NaN or Infinity, and what it reads back may not either.

Python's json module writes float("nan") as the bare word NaN, which is not JSON: other tools refuse the
file, and json.loads reads it back as a value that compares false with everything, so a gate comparing
it passes. Every JSON document llmx writes goes through `dumps`: a non-finite float becomes null, and a
top-level object gains `non_finite` ({path: "NaN" | "Infinity" | "-Infinity"}) saying which values were
replaced and what they were, so a reader tells "measured NaN" from "not measured". Documents read back
as inputs (baselines, records) go through `loads`, which refuses the bare words.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from llmx.common.errors import LlmxError
from llmx.common.text import read_utf8

NON_FINITE_KEY = "non_finite"


class NonFiniteJson(ValueError):
    """A JSON text holds NaN, Infinity or -Infinity, which are not JSON numbers."""


def replace_non_finite(obj: Any) -> tuple[Any, dict[str, str]]:
    """(a copy of `obj` with every non-finite float replaced by None, {dotted path: what it was})."""
    found: dict[str, str] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            found[path or "$"] = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            return None
        if isinstance(value, dict):
            return {key: walk(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return value

    return walk(obj, ""), found


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
          default: Callable[[Any], Any] | None = str) -> str:
    """`obj` as JSON text (no trailing newline) with non-finite floats written as null and listed (module doc)."""
    clean, found = replace_non_finite(obj)
    if found and isinstance(clean, dict):
        earlier = clean.get(NON_FINITE_KEY)
        clean = {**clean, NON_FINITE_KEY: {**(earlier if isinstance(earlier, dict) else {}), **found}}
    return json.dumps(clean, indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)


def _refuse_constant(word: str) -> Any:
    raise NonFiniteJson(f"{word} is not a JSON number")


def loads(text: str) -> Any:
    """json.loads that refuses NaN/Infinity (NonFiniteJson, a ValueError) instead of reading them as floats."""
    return json.loads(text, parse_constant=_refuse_constant)


def non_finite_fields(doc: Any) -> dict[str, str]:
    """The `non_finite` record of a document written by `dumps` (empty when none was replaced)."""
    record = doc.get(NON_FINITE_KEY) if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def restore_non_finite(doc: Any) -> Any:
    """The inverse of `dumps` for a document read back: the nulls listed in `non_finite` become the NaN or
    Infinity they stood for again, so a gate judges the value that was measured, not a missing one."""
    record = non_finite_fields(doc)
    if not record:
        return doc
    values = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

    def walk(value: Any, path: str) -> Any:
        if value is None and path in record:
            return values.get(record[path], math.nan)
        if isinstance(value, dict):
            return {key: walk(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return value

    return walk(doc, "")


def read_json_object(path: Path, *, what: str, remedy: str) -> dict[str, Any]:
    """A JSON object read strictly from `path`; any problem is one LlmxError naming the file and `remedy`.

    what: the kind of document, for the messages ("baseline report", "engine description").
    """
    path = Path(path)
    if not path.exists():
        raise LlmxError(f"{path}: no such {what}; {remedy}.")
    if path.is_dir():
        raise LlmxError(f"{path} is a directory, not a {what} (a JSON file); {remedy}.")
    text = read_utf8(path, what=what)
    try:
        doc = loads(text)
    except NonFiniteJson as exc:
        raise LlmxError(f"{path}: {exc}, so this {what} is not valid JSON; {remedy}.") from None
    except json.JSONDecodeError as exc:
        raise LlmxError(f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                        f"{remedy}.") from None
    if not isinstance(doc, dict):
        raise LlmxError(f"{path} holds a JSON {type(doc).__name__}, not the object a {what} is; {remedy}.")
    return doc

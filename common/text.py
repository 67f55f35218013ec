"""Text read from files and the command line: UTF-8 or one sentence saying where it is not.

A UnicodeDecodeError names a codec and a position but not the file, and text from the command line
with bytes that are not UTF-8 reaches Python as lone surrogates (PEP 383), which fail later, deep in a
tokenizer. Both are caught here, where the text enters, with the file (or option) and the byte offset.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from llmx.common.errors import LlmxError


def utf8_error_offset(data: bytes) -> int | None:
    """The byte offset of the first invalid UTF-8 sequence in `data`, or None when it is all valid."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None


def decode_utf8(data: bytes, *, source: str, what: str = "text") -> str:
    """`data` decoded as UTF-8; otherwise LlmxError naming `source` and the offending byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.end].hex(" ")
        raise LlmxError(f"{source}: byte {exc.start:,} ({bad}) is not valid UTF-8; this {what} must be UTF-8 "
                        "text (re-save it as UTF-8, e.g. with `iconv -t UTF-8`).") from None


def read_utf8(path: Path | str, *, what: str = "text file") -> str:
    """A whole file as UTF-8 text; a missing, unreadable or non-UTF-8 file is one LlmxError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlmxError(f"{path}: no such file; pass an existing {what}.") from None
    except IsADirectoryError:
        raise LlmxError(f"{path} is a directory; pass a {what}.") from None
    except OSError as exc:
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        raise LlmxError(f"{path}: cannot read this {what} ({reason}).") from None
    return decode_utf8(data, source=str(path), what=what)


def check_utf8_argument(value: str, *, option: str) -> str:
    """Command-line text back as it is, or LlmxError when it held bytes that are not UTF-8 (surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        offset = len(value[:exc.start].encode("utf-8"))  # the prefix before the first surrogate is valid
        raise LlmxError(f"{option}: byte {offset:,} of the text given on the command line is not valid UTF-8; "
                        "pass UTF-8 text.") from None
    return value

"""Write an output directory completely or not at all.

Stages write into a hidden temporary sibling of the destination and rename it into place only when every
file is written, so an interrupted or failed run never leaves a half-written directory behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from llmx.common.errors import LlmxError


def check_output_dir(out: Path, *, force: bool, marker_files: tuple[str, ...]) -> None:
    """Refuse to replace an output path that holds something other than an llmx output, unless forced.

    An existing directory that contains one of `marker_files` (e.g. llmx.json, engine.json) is a previous
    llmx output and may be replaced; anything else is the user's data.
    """
    if not out.exists() or force:
        return
    if out.is_file():
        raise LlmxError(f"{out} is a file; choose another output path or pass --force to replace it.")
    if any(out.iterdir()) and not any((out / name).exists() for name in marker_files):
        raise LlmxError(
            f"{out} already holds files that llmx did not write; choose an empty or new output "
            "directory, or pass --force to replace it."
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success replace `out` with it, on failure delete it."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)

"""The pipeline's working directory: where each stage writes, where its record goes, one run at a time.

    WORKDIR/convert/            llmx checkpoint (absent when the model already is one)
    WORKDIR/quantize/           quantized checkpoint (absent when the recipe does not quantize)
    WORKDIR/build/              engine
    WORKDIR/eval/<name>.json    `llmx eval --json` results; reference-<name>.json for the unquantized engine
    WORKDIR/bench/<name>.json   `llmx bench --json` reports
    WORKDIR/.llmx-pipeline/     <stage>.json records, file-hashes.json, lock, scratch space
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from llmx.common.errors import LlmxError

META_DIR = ".llmx-pipeline"


class Workdir:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    @property
    def meta(self) -> Path:
        return self.root / META_DIR

    def output(self, stage: str) -> Path:
        return self.root / stage

    def record_file(self, stage: str) -> Path:
        return self.meta / f"{stage}.json"

    @property
    def hash_cache_file(self) -> Path:
        return self.meta / "file-hashes.json"

    def create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise LlmxError(f"--workdir {self.root} is a file; pass a directory for the pipeline's outputs.")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.meta.is_dir():
            raise LlmxError(f"--workdir {self.root} already holds files that `llmx pipeline` did not write; choose "
                            "an empty or new directory.")
        self.meta.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the workdir for this run: two pipelines writing the same stages would mix their outputs."""
        import fcntl

        with open(self.meta / "lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LlmxError(f"another `llmx pipeline` is running in {self.root}; wait for it or pass another "
                                "--workdir.") from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary sibling renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def files_with_sizes(root: Path, directory: Path) -> dict[str, int]:
    """Every file under `directory` (a file itself, or a folder), by path relative to `root`, with its size."""
    directory = Path(directory)
    if directory.is_file():
        return {directory.relative_to(root).as_posix(): directory.stat().st_size}
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}

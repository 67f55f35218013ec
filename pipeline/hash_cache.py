"""Content hashes of the pipeline's input files, remembered so an unchanged multi-GB model is not re-read.

A file's sha256 is stored under its absolute path together with the (size, mtime_ns, inode) it had when
hashed; the next run re-reads the file only when one of those changed. Content decides, not the stat: a
touched but unchanged file is re-read once and hashes the same, so nothing downstream re-runs; a file
rewritten with other content gets another hash even if it kept its size.

As in git's "racy clean" rule, a file modified within RACY_NS of being hashed is not trusted to the cache:
a same-size rewrite within one timestamp tick would otherwise keep the stale stat stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from llmx.common.hashing import hash_file
from llmx.common.jsonio import dumps
from llmx.pipeline.workdir import write_text_atomic

CACHE_VERSION = 1
RACY_NS = 2_000_000_000  # file timestamps can be this coarse (FAT: 2 s; ext4/tmpfs: a clock tick)


class HashCache:
    """progress: None or callable(label, done_bytes, total_bytes), called as a folder's files are hashed (the
    first run over a multi-GB model reads every byte once, which takes a while)."""

    def __init__(self, file: Path, progress: Callable[[str, int, int], None] | None = None):
        self.file = Path(file)
        self.progress = progress
        self._entries: dict[str, dict] = {}
        self._dirty = False
        try:
            doc = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return  # no cache yet, or a damaged one: everything is simply hashed again
        if isinstance(doc, dict) and doc.get("version") == CACHE_VERSION and isinstance(doc.get("files"), dict):
            self._entries = doc["files"]

    def file_hash(self, path: Path) -> str:
        """"sha256:<hex>" of one file's content."""
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._entries.get(str(path))
        if (entry is not None and entry.get("stat") == stamp
                and st.st_mtime_ns < entry.get("hashed_at_ns", 0) - RACY_NS):
            return entry["sha256"]
        hashed_at = time.time_ns()
        digest = "sha256:" + hash_file(path)
        self._entries[str(path)] = {"stat": stamp, "sha256": digest, "hashed_at_ns": hashed_at}
        self._dirty = True
        return digest

    def tree_hash(self, root: Path) -> str:
        """One hash over a folder: every non-hidden file below it, by relative name and content.

        Hidden entries (.git, .cache/huggingface download metadata) are skipped: llmx reads none of them,
        and tools rewrite them without changing the model.
        """
        root = Path(root).resolve()
        files = sorted(_visible_files(root))
        total = sum((root / relative).stat().st_size for relative in files)
        h = hashlib.sha256()
        done = 0
        for relative in files:
            h.update(relative.encode())
            h.update(b"\0")
            h.update(self.file_hash(root / relative).encode())
            h.update(b"\n")
            done += (root / relative).stat().st_size
            if self.progress is not None:
                self.progress(f"hashing {root.name}", done, total)
        return "sha256:" + h.hexdigest()

    def path_hash(self, path: Path) -> str:
        path = Path(path)
        return self.tree_hash(path) if path.is_dir() else self.file_hash(path)

    def save(self) -> None:
        """Write the cache back (atomically) if anything new was hashed."""
        if not self._dirty:
            return

        write_text_atomic(self.file, dumps({"version": CACHE_VERSION, "files": self._entries}, indent=0) + "\n")
        self._dirty = False


def _visible_files(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found

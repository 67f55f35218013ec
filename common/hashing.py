"""Content hashes for provenance and for reusing unchanged build outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 1 << 20


def hash_file(path: Path, h: "hashlib._Hash | None" = None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One sha256 over several files, their (relative) names included, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode())
        h.update(b"\0")
        hash_file(p, h)
    return "sha256:" + h.hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-serialisable object (keys sorted)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()

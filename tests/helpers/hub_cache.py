"""Lay out folders as huggingface_hub's cache does, so hub IDs resolve offline (HF_HUB_OFFLINE=1).

`add_to_hub_cache(cache, "org/name", folder)` writes `<cache>/models--org--name/`:

    blobs/<sha256 of the content>                 each file's bytes, once
    snapshots/<commit>/<relative path>            symlinks to ../../blobs/<sha256> (deeper for subfolders)
    refs/<revision>                               the commit hash, for each revision given

which is the layout huggingface_hub writes and reads back when it cannot (or may not) reach the hub.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(cache: Path, repo_id: str, folder: Path, *, repo_type: str = "model",
                     revisions: tuple[str, ...] = ("main",), commit: str | None = None) -> Path:
    """Store every file under `folder` as one commit of `repo_id`; return the snapshot folder."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if commit is None:  # a stand-in commit hash: 40 hex digits derived from the content
        digest = hashlib.sha1()
        for path in files:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
        commit = digest.hexdigest()
    repo_dir = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for path in files:
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for revision in revisions:
        ref = repo_dir / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snapshot

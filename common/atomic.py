"""Write an output directory completely or not at all, one writer at a time.

Stages write into a hidden temporary sibling of the destination and rename it into place only when every
file is written, so an interrupted or failed run never leaves a half-written directory behind. A lock file
beside the destination (`.<name>.lock`, held with flock for the whole write) makes a second process writing
the same output refuse at once instead of overwriting the first one's work; whoever holds the lock removes the
temporary siblings a killed run (SIGKILL, power loss) left, since no live writer can own them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from llmx.common.errors import LlmxError

# Output paths under these are kernel interfaces or devices, never a place for files.
_SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_dir(out: Path, *, force: bool, marker_files: tuple[str, ...], inputs: Iterable[Path] = ()) -> None:
    """Refuse an output path llmx must not replace or cannot write, before any work starts.

    Always refused, `--force` included: the current directory or a folder holding it, an input (or a folder
    holding one), a path under /proc, /sys or /dev, and a destination whose parent is not a writable
    directory. An existing directory that contains one of `marker_files` (e.g. llmx.json, engine.json) is a
    previous llmx output and may be replaced; anything else is the user's data and needs `force`.
    """
    out = Path(out)
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise LlmxError(f"output {out} is the current directory or holds it; replacing it would delete your "
                        "working files: choose a new subdirectory (e.g. -o ./out).")
    for src in inputs:
        src_r = Path(src).resolve()
        if resolved == src_r or resolved in src_r.parents:
            raise LlmxError(f"output {out} would replace the input folder {src}; choose another output directory.")
    if any(resolved == root or root in resolved.parents for root in _SPECIAL_ROOTS):
        raise LlmxError(f"output {out} is under {resolved.parts[0]}{resolved.parts[1]}, a system folder that holds "
                        "no files; choose an output directory on a disk.")
    _check_parent_writable(out, resolved)
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise LlmxError(f"{out} is a file; choose another output path or pass --force to replace it.")
    if any(out.iterdir()) and not any((out / name).exists() for name in marker_files):
        raise LlmxError(
            f"{out} already holds files that llmx did not write; choose an empty or new output "
            "directory, or pass --force to replace it."
        )


def check_free_space(out: Path, need_bytes: int, what: str) -> None:
    """Refuse before the work starts when the disk that will hold `out` has less free space than it needs.

    need_bytes: the output's size (an estimate within a few percent); 2% more is asked for, for file headers and
    the files that travel with the weights.
    """
    ancestor = _nearest_existing(Path(out).resolve().parent)
    free = shutil.disk_usage(ancestor).free
    if free < need_bytes * 1.02:
        raise LlmxError(f"{out}: the {what} needs about {_gb(need_bytes)} and {ancestor} has {_gb(free)} free; "
                        "free some space or choose an output directory on another disk.")


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (where a new output directory would be created)."""
    while not path.exists():
        path = path.parent
    return path


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:,.1f} MB"


def _check_parent_writable(out: Path, resolved: Path) -> None:
    """The nearest existing ancestor must be a directory this process can create entries in."""
    ancestor = _nearest_existing(resolved.parent)
    if not ancestor.is_dir():
        raise LlmxError(f"output {out} cannot be created: {ancestor} is a file, not a directory; choose another "
                        "output path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LlmxError(f"output {out} cannot be written: {ancestor} is not writable by this user (or is on a "
                        "read-only file system); choose an output directory you can write to.")


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success replace `out` with it, on failure delete it."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        remove_leftovers(out)
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


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` exclusively; refuse at once if another live process holds it.

    The lock file is removed on release. A process that opened the file just before it was removed would lock
    an orphaned inode, so after locking each holder checks that the path still names the inode it locked, and
    starts over if not. The kernel drops a killed process's flock, so a SIGKILL never leaves a stale lock.
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise LlmxError(f"another llmx process{who} is writing {out}; wait for it to finish, or choose "
                            "another output directory.") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary siblings of `out` (`.<name>.tmp-XXXXXXXX`, `.<name>.old-PID`) a killed run left.

    Call only while holding `output_lock(out)`: then no live process owns them. Returns what was removed.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp-[a-z0-9_]{{8}}|old-\d+)$")
    removed = []
    for entry in out.parent.iterdir():
        if pattern.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed

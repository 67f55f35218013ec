"""The one exception type users see.

Every bad input (missing file, malformed config, impossible layout) is raised as an LlmxError whose
message is one sentence naming the file or field and what to do. The CLI prints the message, without a
traceback, and exits with `exit_code`. Library code raises it at the edges (CLI, recipe, checkpoint
loading) and trusts validated inputs inside.
"""

from __future__ import annotations

import errno
import os
import re


class LlmxError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0])


class GateFailure(LlmxError):
    """A regression gate (bench baseline, eval perplexity) did not pass: exit code 1, not an input error."""

    exit_code = 1


# What to do about an OSError, by errno: the part of the sentence the system's own message lacks.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space or write the output to another disk",
    errno.EDQUOT: "free some space or write the output elsewhere",
    errno.EFBIG: "the file outgrew the file-size limit (`ulimit -f`) or what this file system stores: raise the "
                 "limit or write the output to another file system",
    errno.EACCES: "choose a path you may write to, or change its permissions",
    errno.EPERM: "choose another path",
    errno.EROFS: "write the output somewhere writable",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file: check the path",
    errno.EISDIR: "a file was expected there: check the path",
    errno.EEXIST: "choose another path or remove it",
    errno.ENOTEMPTY: "choose another path or remove it",
    errno.EMFILE: "raise the limit (`ulimit -n`)",
    errno.ENOMEM: "close other programs or use a smaller model or batch",
    errno.EXDEV: "keep the output on the same file system as its folder",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "the path has a symbolic-link loop: check the path",
}


def describe_exception(exc: BaseException) -> str | None:
    """One sentence for an exception that is the environment's fault, not llmx's; None for anything else.

    Used at the CLI boundary (and by the pipeline for a failed stage): a full disk, a read-only or
    missing path, a file-size limit or running out of memory is explained, with the path and what the
    errno means; any other exception is a bug and keeps its traceback.
    """
    if isinstance(exc, LlmxError):
        return exc.message
    if isinstance(exc, OSError):
        code = exc.errno
        name = errno.errorcode.get(code, "") if code is not None else ""
        reason = exc.strerror or (os.strerror(code) if code is not None else str(exc))
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        where = f"{paths}: " if paths else ""
        advice = _OS_ERROR_ADVICE.get(code) if code is not None else None
        tail = f"; {advice}" if advice else ""
        return f"{where}{reason}{f' ({name})' if name else ''}{tail}."
    if isinstance(exc, MemoryError):
        return "out of memory: close other programs, or use a smaller model, batch or --kv-cache-tokens."
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc):
        wanted = re.search(r"allocate (\d+) bytes", str(exc))
        size = f" ({int(wanted.group(1)) / 2**30:,.1f} GiB at once)" if wanted else ""
        return (f"the machine ran out of memory{size}: lower --kv-cache-tokens, --max-batch-size or --max-seq-len, "
                "or use a smaller model.")
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, named without importing torch
        return ("the GPU ran out of memory: lower --kv-cache-fraction, --max-batch-size or --max-num-tokens, or "
                "use a smaller model.")
    if isinstance(exc, UnicodeDecodeError):
        return (f"text that is not valid UTF-8 was read (byte {exc.start:,}: {exc.reason}); llmx reads UTF-8 "
                "text files only: re-save the file as UTF-8.")
    return None

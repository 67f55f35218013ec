"""The one exception type users see.

Every bad input (missing file, malformed config, impossible layout) is raised as an LlmxError whose
message is one sentence naming the file or field and what to do. The CLI prints the message, without a
traceback, and exits with `exit_code`. Library code raises it at the edges (CLI, recipe, checkpoint
loading) and trusts validated inputs inside.
"""

from __future__ import annotations


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

"""Progress as plain lines, for when stderr is not a terminal (CI logs, `2> log`, pipes).

A bar that cannot redraw is noise, but a 15-minute calibration that prints nothing looks hung. So, off a
terminal, each stage prints one line when it starts, then at most one line every `interval` seconds, and one
when it completes:

    llmx: calibrate 12/64 (19%), 0.41/s, 29 s elapsed, ETA 2 min 7 s
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TextIO

# Seconds between two lines of the same stage: often enough to show life in a log, rare enough to stay readable.
LINE_INTERVAL_S = 15.0


@dataclass
class _Stage:
    started: float
    first_done: int  # what was done at the stage's first report: the rate counts progress made since then
    last_line: float
    finished: bool = False  # its completion line is printed


class ProgressLines:
    """A `(stage, done, total)` progress sink writing plain lines to `stream`."""

    def __init__(self, stream: TextIO, *, interval: float = LINE_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.interval, self.clock = stream, interval, clock
        self.stages: dict[str, _Stage] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        state = self.stages.get(stage)
        complete = total > 0 and done >= total
        if state is None:
            state = self.stages[stage] = _Stage(started=now, first_done=done, last_line=now)
        elif not complete and now - state.last_line < self.interval:
            return
        elif complete and state.finished:
            return
        state.last_line, state.finished = now, complete
        self.stream.write(self._line(stage, done, total, done - state.first_done, now - state.started) + "\n")
        self.stream.flush()

    @staticmethod
    def _line(stage: str, done: int, total: int, progressed: int, elapsed: float) -> str:
        """progressed: units done since the stage's first report, `elapsed` seconds ago."""
        parts = [f"llmx: {stage} {done}/{total}" if total > 0 else f"llmx: {stage} {done}"]
        if total > 0:
            parts[0] += f" ({100 * done / total:.0f}%)"
        if elapsed > 0 and progressed > 0:
            parts.append(f"{progressed / elapsed:.3g}/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if total > 0 and done < total and elapsed > 0 and progressed > 0:
            parts.append(f"ETA {_duration(elapsed * (total - done) / progressed)}")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"

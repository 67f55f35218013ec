"""Rank 0's watch over the rank processes it started: a rank that exits or stops responding ends the job within
seconds, with one sentence naming the rank.

Each started rank runs a heartbeat thread that writes the time (time.monotonic, one clock for every process
of the host) into a shared double twice a second; a process that is stopped (SIGSTOP, a debugger, swapped out)
or wedged with its interpreter frozen stops writing. A watch thread in rank 0 polls every rank's liveness and
heartbeat. On a fault it records the sentence and kills that rank, which makes rank 0's pending gloo
collective fail at once, so the caller raises the recorded sentence. If rank 0 is inside a call to the ranks
and does not come back within GRACE_S (an NCCL collective waits on a dead peer until its own timeout), the watch
prints the sentence, stops every rank and ends the process with exit code 1: a hang is never the outcome.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Sequence

POLL_S = 0.25
BEAT_S = 0.5
GRACE_S = 5.0  # after a fault, how long rank 0's pending call may take to fail by itself


def start_heartbeat(beat: Any) -> None:
    """In a started rank: keep `beat.value` at the current monotonic time from a daemon thread."""

    def run() -> None:
        while True:
            beat.value = time.monotonic()
            time.sleep(BEAT_S)

    threading.Thread(target=run, name="llmx-heartbeat", daemon=True).start()


class RankWatch:
    """Watches ranks 1..N (their processes and heartbeats) from rank 0."""

    def __init__(self, procs: Sequence[Any], beats: Sequence[Any], world_size: int, stall_s: float):
        self.procs, self.beats, self.world_size, self.stall_s = list(procs), list(beats), world_size, stall_s
        self.fault: str | None = None
        self._calls = 0  # > 0 while rank 0 is inside a call that waits on the other ranks
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmx-rank-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def call_started(self) -> None:
        with self._lock:
            self._calls += 1

    def call_ended(self) -> None:
        with self._lock:
            self._calls -= 1

    def _find_fault(self) -> str | None:
        """Record (in self.fault) and return the first rank that exited or went silent; None if all are well."""
        now = time.monotonic()
        for rank, (proc, beat) in enumerate(zip(self.procs, self.beats), start=1):
            if not proc.is_alive():
                self.fault = f"rank {rank} of {self.world_size} exited with code {proc.exitcode}"
                return self.fault
            silent = now - beat.value
            if silent > self.stall_s:
                # recorded before the kill: rank 0's gloo collective fails as soon as the rank's sockets close
                self.fault = f"rank {rank} of {self.world_size} stopped responding for {silent:.0f} s (it was stopped)"
                proc.kill()
                return self.fault
        return None

    def _run(self) -> None:
        while not self._stopped.wait(POLL_S):
            fault = self._find_fault()
            if fault is None:
                continue
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and not self._stopped.is_set():
                with self._lock:
                    if self._calls == 0:
                        return  # rank 0 came back (or was idle): its next call reports the fault
                time.sleep(POLL_S)
            if self._stopped.is_set():
                return
            self._abort(fault)

    def _abort(self, fault: str) -> None:
        """Rank 0 is stuck in a collective with a dead peer: say why, stop every rank, end the process."""
        print(f"error: {fault}; the job is stopped.", file=sys.stderr, flush=True)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        os._exit(1)

"""One thread drives `LLM.step`; HTTP handlers (on the asyncio loop) hand it requests and read their pieces.

Requests join the in-flight batch between steps as they arrive: the handler appends a command to the inbox
and wakes the thread, which adds it before its next step. Everything that touches the LLM (adding, stepping,
aborting, detokenizing) happens on this thread; each step's outputs are copied into plain `Piece`s and
handed to the request's asyncio queue with `call_soon_threadsafe`, so handlers never read runtime state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

from llmx.common.errors import LlmxError
from llmx.runtime.sequence import SamplingParams


@dataclass
class Piece:
    """What one step added to a request (or why it ended)."""

    text: str
    token_ids: list[int]
    logprobs: list | None  # TokenLogprobs of token_ids, when asked for
    finished: bool = False
    finish_reason: str | None = None  # "stop" / "length" (OpenAI's names), "abort", "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    prompt_logprobs: list | None = None  # on the first piece, when asked for


@dataclass(eq=False)
class RequestHandle:
    """One engine request as a handler sees it. Its Pieces go, as (index, piece), to `queue`, which the
    requests of one HTTP call (its prompts times n) share, so one reader sees them in the order they came."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int
    request_id: int | None = None  # the LLM's id, set on the engine thread
    done: bool = False
    first_piece: bool = True

    def put(self, piece: Piece) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, piece))


def _put_all(batch: list[tuple["RequestHandle", Piece]]) -> None:
    """On the event loop: hand a step's pieces to their queues (one wake-up of the loop per step, not per piece)."""
    for handle, piece in batch:
        handle.queue.put_nowait((handle.index, piece))


class EngineLoop:
    """Owns the LLM once started: `submit` and `abort` are the only ways in, safe from any thread."""

    def __init__(self, llm, metrics):
        self.llm = llm
        self.metrics = metrics
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Event()
        self._handles: dict[int, RequestHandle] = {}
        self._stopping = False
        self._draining = False  # set on SIGINT/SIGTERM: no new requests, open ones finish or are aborted
        self.failure: str | None = None  # set if a step raised: the server then answers 503
        self._thread = threading.Thread(target=self._run, name="llmx-engine-loop", daemon=True)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.failure is None and not self._stopping and not self._draining

    def drain(self, grace_period: float) -> None:
        """Take no new requests; abort those still open after grace_period seconds (safe from a signal
        handler: it only sets a flag and starts a timer)."""
        if self._draining:
            return
        self._draining = True
        timer = threading.Timer(grace_period, self._queue_abort_all)
        timer.daemon = True
        timer.start()

    def _queue_abort_all(self) -> None:
        self._inbox.append(("abort_all", None))
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the thread and close the LLM (its other ranks too)."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self.llm.close()

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue, index: int) -> RequestHandle:
        """Queue a request (on the event loop's thread); its pieces arrive in `queue` tagged with `index`."""
        handle = RequestHandle(asyncio.get_running_loop(), queue, index)
        self._inbox.append(("add", handle, prompt_ids, params))
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        if not handle.done:
            self._inbox.append(("abort", handle))
            self._wake.set()

    @property
    def num_queued(self) -> int:
        return sum(1 for command in self._inbox if command[0] == "add")

    # ---- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        llm = self.llm
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain_inbox()
                if llm.has_unfinished():
                    self._deliver(llm.step())
                    self.metrics.observe_engine(llm, self.num_queued)
                else:
                    self.metrics.observe_engine(llm, self.num_queued)
                    self._wake.wait()
        except Exception as exc:  # a step failed: every request still open is told, and /health turns 503
            self.failure = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._abort_all()

    def _drain_inbox(self) -> None:
        while self._inbox:
            command = self._inbox.popleft()
            handle = command[1]
            if command[0] == "add":
                self._add(handle, command[2], command[3])
            elif command[0] == "abort_all":
                self._abort_all()
            elif handle.request_id is not None and not handle.done:
                self.llm.abort(handle.request_id)
                self._end(handle, Piece("", [], None, True, "abort"), None)

    def _add(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            handle.request_id = self.llm.add_request(prompt_ids, params)
        except LlmxError as exc:
            handle.done = True
            handle.put(Piece("", [], None, True, "error", exc.message))
            return
        self._handles[handle.request_id] = handle
        self.metrics.request_added(len(prompt_ids))

    def _deliver(self, outputs) -> None:
        handles = self._handles
        batch: list[tuple[RequestHandle, Piece]] = []
        for output in outputs:
            handle = handles.get(output.request_id)
            if handle is None:
                continue
            logprobs = output.logprobs
            if logprobs is not None:
                logprobs = logprobs[len(logprobs) - len(output.new_token_ids):]
            piece = Piece(output.new_text, list(output.new_token_ids), logprobs, output.finished,
                          _openai_reason(output.finish_reason), output.error, len(output.prompt_token_ids),
                          len(output.output_token_ids))
            if handle.first_piece:
                handle.first_piece = False
                piece.prompt_logprobs = output.prompt_logprobs
            if output.finished:
                self._end(handle, piece, output, batch)
            else:
                batch.append((handle, piece))
        if batch:
            batch[0][0].loop.call_soon_threadsafe(_put_all, batch)  # the server runs one event loop

    def _end(self, handle: RequestHandle, piece: Piece, output, batch: list | None = None) -> None:
        handle.done = True
        self._handles.pop(handle.request_id, None)
        if batch is None:
            handle.put(piece)
        else:
            batch.append((handle, piece))
        self.metrics.request_finished(piece.finish_reason, output, time.perf_counter())

    def _abort_all(self) -> None:
        for handle in list(self._handles.values()):
            try:
                self.llm.abort(handle.request_id)
            except Exception:  # the engine may be broken (that is why we are here): tell the clients anyway
                pass
            reason = "error" if self.failure else "abort"
            self._end(handle, Piece("", [], None, True, reason, self.failure or "the server is shutting down"), None)
        while self._inbox:
            command = self._inbox.popleft()
            if command[0] == "add":
                command[1].done = True
                command[1].put(Piece("", [], None, True, "abort", "the server is shutting down"))


def _openai_reason(reason: str | None) -> str | None:
    """The runtime's finish reasons in OpenAI's words: an EOS or stop token/string is "stop"."""
    return "stop" if reason in ("eos", "stop") else reason

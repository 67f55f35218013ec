"""What the runtime hands back for a request, with the timestamps bench needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from llmx.runtime.sequence import Sequence


@dataclass
class RequestMetrics:
    """Host wall-clock times (time.perf_counter seconds) of a request's life.

    `token_times[j]` is when output token j became available to the caller (after the step that produced
    it returned), so TTFT = token_times[0] - arrival_time and ITL_j = token_times[j] - token_times[j-1].
    """

    arrival_time: float
    scheduled_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return self.finish_time - self.arrival_time if self.finish_time is not None else None


class TextSource(Protocol):
    def text_between(self, start: int, end: int) -> str:
        """The visible text that output tokens [start, end) of the request added."""


class RequestOutput:
    """The state of one request after a step: everything generated so far plus what is new.

    `text` is the detokenized output so far (stop strings cut); `new_token_ids` / `new_text` are what this
    step added (for streaming). `error` is set, with finish_reason "error", when the request could not be
    served (e.g. its prompt is longer than the engine's max_seq_len); other requests are unaffected.

    An output is a view of its request as of the step that made it, built in a few attribute stores because
    a step makes one for every request it advanced: the identity fields are read from the request's
    sequence (they no longer change), and `output_token_ids`, `text` and `new_text` are worked out when
    first read (copying or detokenizing every request's output each step would cost host time that grows with
    batch x length, for nothing when the caller only counts tokens, as bench does). Read later, they still
    give their value as of this step: the output covers the first `num_output_tokens` tokens of the
    sequence's output, which later steps only extend.
    """

    __slots__ = ("metrics", "new_token_ids", "finished", "_seq", "_num_output_tokens", "_text_source",
                 "_output_token_ids")

    def __init__(self, seq: Sequence, metrics: RequestMetrics, new_token_ids: list[int], finished: bool,
                 text_source: TextSource | None = None):
        self.metrics = metrics
        self.new_token_ids = new_token_ids
        self.finished = finished
        self._seq = seq
        self._num_output_tokens = len(seq.output_token_ids)
        self._text_source = text_source
        self._output_token_ids: list[int] | None = None

    @property
    def request_id(self) -> int:
        return self._seq.seq_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._seq.prompt_token_ids

    @property
    def num_cached_prompt_tokens(self) -> int:
        return self._seq.num_cached_prompt_tokens

    @property
    def finish_reason(self) -> str | None:
        reason = self._seq.finish_reason
        return reason.value if self.finished and reason is not None else None

    @property
    def error(self) -> str | None:
        return self._seq.error if self.finished else None

    @property
    def output_token_ids(self) -> list[int]:
        if self._output_token_ids is None:
            self._output_token_ids = self._seq.output_token_ids[:self._num_output_tokens]
        return self._output_token_ids

    @property
    def logprobs(self) -> list | None:
        """TokenLogprobs of each output token so far (runtime/model_runner.py), when the request asked for them."""
        lps = self._seq.output_logprobs
        return None if lps is None else lps[:self._num_output_tokens]

    @property
    def prompt_logprobs(self) -> list | None:
        """[None, TokenLogprobs of each later prompt token], when the request asked for them."""
        return self._seq.prompt_logprobs

    @property
    def text(self) -> str:
        if self._text_source is None:
            return ""
        return self._text_source.text_between(0, self._num_output_tokens)

    @property
    def new_text(self) -> str:
        if self._text_source is None:
            return ""
        end = self._num_output_tokens
        return self._text_source.text_between(end - len(self.new_token_ids), end)

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id}, num_output_tokens={self._num_output_tokens}, "
                f"new_token_ids={self.new_token_ids}, finished={self.finished}, "
                f"finish_reason={self.finish_reason!r}, error={self.error!r})")

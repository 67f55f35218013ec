"""What the runtime hands back for a request, with the timestamps bench needs."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class RequestOutput:
    """The state of one request after a step: everything generated so far plus what is new.

    `text` is the detokenized output so far (stop strings cut); `new_token_ids` / `new_text` are what this
    step added (for streaming). `error` is set, with finish_reason "error", when the request could not be
    served (e.g. its prompt is longer than the engine's max_seq_len); other requests are unaffected.
    """

    request_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None
    num_cached_prompt_tokens: int = 0

"""A request as the scheduler sees it: its tokens, its progress and its KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's limit for top_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings.

    temperature 0 means greedy. top_k 0 and top_p 1.0 disable those filters. `seed` makes sampling
    reproducible per request, independent of what else is in the batch. Generation stops at
    `max_new_tokens`, at an EOS token (unless `ignore_eos`), at any of `stop_token_ids`, or when the
    detokenized output ends with one of `stop` (the stop string is cut from the returned text).

    Penalties change the logits before greedy choice or sampling (OpenAI's and HF's definitions):
    `presence_penalty` is subtracted once from every token already generated, `frequency_penalty` once per
    time it was generated, and `repetition_penalty` divides the positive (multiplies the negative) logits
    of every token in the prompt or the output; 0, 0 and 1 turn them off. `min_tokens` forbids the EOS
    tokens and `stop_token_ids` until that many tokens are generated. `logprobs` (k >= 0) returns, for each
    generated token, its log-probability and the k likeliest alternatives; `prompt_logprobs` (k >= 0) the
    same for every prompt token after the first. Log-probabilities are the model's own (before penalties
    and temperature).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_token_history(self) -> bool:
        """Whether sampling needs the tokens generated so far (penalties) or their count (min_tokens)."""
        return self.has_penalties or self.min_tokens > 0

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of the index-th of n completions of one prompt: a seeded request draws each
        completion from its own stream (seed + index), so the n completions differ and each is reproducible."""
        return self if self.seed is None or index == 0 else replace(self, seed=self.seed + index)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted (its KV freed; it recomputes on resumption)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"
    STOP = "stop"  # a stop token id or stop string
    ERROR = "error"  # the request could not be served (e.g. prompt longer than the engine allows)
    ABORT = "abort"  # the caller gave the request up (LLM.abort); its KV blocks are freed


@dataclass(eq=False)
class Sequence:
    """One request. Identity is the object (eq=False): the scheduler keeps them in lists and dicts.

    `num_computed_tokens` counts tokens whose KV is in the cache; `block_table` lists the KV block ids
    holding positions [0, len(block_table) * block_size).
    """

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache on admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = 0.0
    num_preemptions: int = 0
    output_logprobs: list | None = None  # TokenLogprobs per output token, when params.logprobs is set
    prompt_logprobs: list | None = None  # [None, TokenLogprobs per later prompt token], when asked for

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building token_ids (which copies the prompt and the whole output):
        a decode step needs one token of a sequence that may hold thousands."""
        prompt = self.prompt_token_ids
        n = len(prompt)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return prompt[start:end]
        return prompt[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error

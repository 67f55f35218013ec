"""Feed benchmark requests to an LLM from one process and timestamp every token on the host.

Two ways of offering load:
- concurrency C (default: every request at once, i.e. maximum load, "offline throughput"): C requests are
  kept in flight; when one finishes the next is added before the following step.
- request rate R req/s: arrivals follow a Poisson process (exponential gaps, seeded). A request's arrival
  is its scheduled time, so time spent waiting for a running step to return counts in its latency.

Timestamps are `clock()` reads taken right after `llm.step()` returns: all tokens a step produced share
that time. Nothing else (tokenization, request construction) sits inside a measured step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from llmx.bench.workload import BenchRequest


class SteppableLLM(Protocol):
    def add_request(self, prompt: list[int], params) -> int: ...
    def step(self) -> list: ...


@dataclass
class RequestRecord:
    """Host times (clock seconds) of one measured request."""

    input_len: int
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    output_len: int = 0
    error: str | None = None


def poisson_arrival_offsets(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of a Poisson process of `request_rate` req/s; the first is 0."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


def drive(llm: SteppableLLM, requests: list[BenchRequest], *, concurrency: int | None = None,
          request_rate: float | None = None, seed: int = 0, clock: Callable[[], float] = time.perf_counter,
          sleep: Callable[[float], None] = time.sleep,
          on_progress: Callable[[int, int], None] | None = None) -> list[RequestRecord]:
    """Run `requests` to completion; returns one record per request, in request order.

    `on_progress(finished, total)` is called after a step in which requests finished (after the step's
    timestamp is taken, so it is not inside any measured interval of a token).
    """
    if concurrency is not None and request_rate is not None:
        raise ValueError("give a concurrency or a request rate, not both")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    n = len(requests)
    records = [RequestRecord(input_len=r.input_len) for r in requests]
    offsets = poisson_arrival_offsets(n, request_rate, seed) if request_rate is not None else None
    limit = concurrency or n
    record_of: dict[int, RequestRecord] = {}
    next_index = finished = 0
    start = clock()
    while finished < n:
        now = clock()
        while next_index < n and len(record_of) < limit and (offsets is None or start + offsets[next_index] <= now):
            record = records[next_index]
            record.arrival = start + offsets[next_index] if offsets is not None else now
            request = requests[next_index]
            record_of[llm.add_request(list(request.prompt_token_ids), request.sampling_params())] = record
            next_index += 1
        if not record_of:  # only in rate mode: idle until the next arrival
            sleep(max(0.0, start + offsets[next_index] - clock()))
            continue
        outputs = llm.step()
        stamp = clock()
        for output in outputs:
            record = record_of[output.request_id]
            record.token_times.extend([stamp] * len(output.new_token_ids))
            if output.finished:
                record.finish, record.error = stamp, output.error
                record.output_len = len(output.output_token_ids)
                del record_of[output.request_id]
                finished += 1
                if on_progress is not None:
                    on_progress(finished, n)
    return records

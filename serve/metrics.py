"""The server's Prometheus metrics, in a registry of its own (names prefixed `llmx_`).

Engine state (requests running and waiting, KV-cache use, prefix-cache hits, preemptions) is copied from the
engine thread after every step and read at scrape time; latencies and token counts are recorded as each
request finishes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineState:
    """A prometheus collector over the last snapshot of the engine's counters."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot = {"running": 0, "waiting": 0, "kv_usage": 0.0, "prefix_hit_tokens": 0, "preemptions": 0}

    def collect(self):
        s, labels = self.snapshot, [self.model_name]
        for name, doc, value in (("llmx_requests_running", "Requests in the batch now.", s["running"]),
                                 ("llmx_requests_waiting", "Requests waiting for a seat in the batch.", s["waiting"]),
                                 ("llmx_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by requests.",
                                  s["kv_usage"])):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        for name, doc, value in (("llmx_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  s["prefix_hit_tokens"]),
                                 ("llmx_preemptions", "Requests preempted (KV freed, recomputed later).",
                                  s["preemptions"])):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self._state = _EngineState(model_name)
        self.registry.register(self._state)
        labels = ["model_name"]
        self._name = model_name
        self.prompt_tokens = Counter("llmx_prompt_tokens", "Prompt tokens of requests admitted.", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("llmx_generation_tokens", "Tokens generated.", labels,
                                         registry=self.registry)
        self.requests = Counter("llmx_requests_finished", "Requests finished, by finish reason.",
                                labels + ["finish_reason"], registry=self.registry)
        self.ttft = Histogram("llmx_time_to_first_token_seconds", "Time from arrival to the first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("llmx_time_per_output_token_seconds", "Mean time between output tokens of a request.",
                              labels, buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmx_e2e_request_latency_seconds", "Time from arrival to the last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_engine(self, llm, num_queued: int) -> None:
        """Called by the engine thread after each step (and when it goes idle)."""
        scheduler = llm.scheduler
        self._state.snapshot = {"running": scheduler.num_running, "waiting": scheduler.num_waiting + num_queued,
                                "kv_usage": llm.block_manager.usage,
                                "prefix_hit_tokens": llm.block_manager.prefix_hit_tokens,
                                "preemptions": scheduler.num_preemptions}

    def request_added(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.labels(self._name).inc(num_prompt_tokens)

    def request_finished(self, reason: str | None, output, now: float) -> None:
        self.requests.labels(self._name, reason or "unknown").inc()
        if output is None:
            return
        metrics = output.metrics
        times = metrics.token_times
        self.generation_tokens.labels(self._name).inc(len(output.output_token_ids))
        if times:
            self.ttft.labels(self._name).observe(times[0] - metrics.arrival_time)
            self.e2e.labels(self._name).observe(times[-1] - metrics.arrival_time)
        if len(times) > 1:
            self.tpot.labels(self._name).observe((times[-1] - times[0]) / (len(times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)

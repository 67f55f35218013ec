"""The driver and a whole benchmark run against a fake LLM on a fake clock: load shapes and timestamps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from llmx.formats.config import Mapping
from llmx.bench.driver import drive, poisson_arrival_offsets
from llmx.bench.runner import BenchOptions, run_benchmark
from llmx.bench.workload import BenchRequest
from llmx.common.errors import LlmxError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class FakeLLM:
    """Each step takes `step_time` on the clock and gives one token to up to `max_batch` running requests.

    Prompts longer than `max_seq_len` fail on their first step, as the real runtime's do.
    """

    def __init__(self, clock: FakeClock, *, step_time=0.01, max_batch=1000, max_seq_len=10_000):
        self.clock, self.step_time, self.max_batch, self.max_seq_len = clock, step_time, max_batch, max_seq_len
        self.requests: dict[int, dict] = {}
        self.added_at: list[float] = []
        self.max_in_flight = 0
        self.steps = 0
        self.preemptions = 0
        # What run_benchmark reads besides add_request/step.
        self.tokenizer = _Tokenizer()
        self.engine = SimpleNamespace(path="fake-engine", model=SimpleNamespace(
            vocab_size=64, architecture="FakeForCausalLM", family="llama", num_layers=2, hidden_size=8),
            dtype="bfloat16", quant=None, build={"max_batch_size": max_batch}, mapping=Mapping(tp=1, pp=1),
            target={"device": "cpu"})

    def add_request(self, prompt, params):
        request_id = len(self.added_at)
        self.added_at.append(self.clock())
        self.requests[request_id] = {"prompt": list(prompt), "want": params.max_new_tokens, "out": []}
        assert params.ignore_eos
        return request_id

    def step(self):
        self.steps += 1
        self.clock.now += self.step_time
        running = list(self.requests.items())[: self.max_batch]
        self.max_in_flight = max(self.max_in_flight, len(self.requests))
        outputs = []
        for request_id, req in running:
            if len(req["prompt"]) > self.max_seq_len:
                del self.requests[request_id]
                outputs.append(SimpleNamespace(request_id=request_id, new_token_ids=[], output_token_ids=[],
                                               finished=True, error="prompt too long"))
                continue
            req["out"].append(7)
            done = len(req["out"]) == req["want"]
            if done:
                del self.requests[request_id]
            outputs.append(SimpleNamespace(request_id=request_id, new_token_ids=[7], output_token_ids=list(req["out"]),
                                           finished=done, error=None))
        return outputs

    def stats(self):
        return {"device": "cpu", "device_name": "fake", "kv_cache_blocks": 10, "kv_blocks_peak_used": 4,
                "kv_block_size": 16, "kv_cache_tokens": 160, "kv_cache_bytes": 1000, "kv_cache_dtype": "bfloat16",
                "peak_device_memory_bytes": None, "num_preemptions": self.preemptions,
                "prefix_cache_hit_tokens": 0}


class _Tokenizer:
    all_special_ids = [0, 1]

    def __len__(self):
        return 60

    def encode(self, text):
        return [5] * len(text)


def requests(n, isl=4, osl=3):
    return [BenchRequest(tuple(range(2, 2 + isl)), osl) for _ in range(n)]


def test_default_load_puts_every_request_in_flight_at_once():
    clock = FakeClock()
    llm = FakeLLM(clock)
    records = drive(llm, requests(6), clock=clock, sleep=clock.sleep)
    assert llm.max_in_flight == 6
    assert llm.steps == 3  # every request advances each step: 3 output tokens = 3 steps
    assert all(r.arrival == 0.0 for r in records)
    assert all(r.token_times == pytest.approx([0.01, 0.02, 0.03]) for r in records)
    assert all(r.finish == pytest.approx(0.03) and r.output_len == 3 and r.error is None for r in records)


def test_concurrency_is_respected_and_refilled():
    clock = FakeClock()
    llm = FakeLLM(clock)
    seen = []
    records = drive(llm, requests(7, osl=2), concurrency=3, clock=clock, sleep=clock.sleep,
                    on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]
    assert llm.max_in_flight == 3
    # 7 requests, 3 at a time, 2 steps each: waves start at t=0, 0.02, 0.04.
    assert [r.arrival for r in records] == pytest.approx([0, 0, 0, 0.02, 0.02, 0.02, 0.04])
    assert llm.steps == 6
    assert [r.finish for r in records] == pytest.approx([0.02] * 3 + [0.04] * 3 + [0.06])


def test_request_rate_follows_seeded_poisson_arrivals():
    clock = FakeClock()
    llm = FakeLLM(clock, step_time=0.001)
    records = drive(llm, requests(20, osl=2), request_rate=50.0, seed=7, clock=clock, sleep=clock.sleep)
    offsets = poisson_arrival_offsets(20, 50.0, 7)
    assert offsets == poisson_arrival_offsets(20, 50.0, 7) and offsets != poisson_arrival_offsets(20, 50.0, 8)
    assert offsets[0] == 0.0 and all(b > a for a, b in zip(offsets, offsets[1:]))
    assert [r.arrival for r in records] == pytest.approx(offsets)
    # Each request is added at the first loop turn after its arrival: never early, at most one step late.
    for added, offset in zip(llm.added_at, offsets):
        assert offset - 1e-12 <= added <= offset + 0.001 + 1e-12
    # The mean gap approaches 1/rate (loose bound: 19 exponential gaps).
    assert 0.005 < offsets[-1] / 19 < 0.06


def test_request_rate_measures_from_the_scheduled_arrival_not_the_add():
    # Steps of 0.5 s and arrivals every ~0.01 s: later requests wait for the running step, and that wait counts.
    clock = FakeClock()
    llm = FakeLLM(clock, step_time=0.5)
    records = drive(llm, requests(3, osl=1), request_rate=100.0, seed=0, clock=clock, sleep=clock.sleep)
    assert llm.added_at[1] > records[1].arrival
    assert records[1].token_times[0] - records[1].arrival > 0.5


def test_errors_are_recorded_per_request():
    clock = FakeClock()
    llm = FakeLLM(clock, max_seq_len=5)
    reqs = requests(2, isl=4) + requests(1, isl=9)
    records = drive(llm, reqs, clock=clock, sleep=clock.sleep)
    assert [r.error for r in records] == [None, None, "prompt too long"]


def test_concurrency_and_rate_together_are_refused():
    with pytest.raises(ValueError):
        drive(FakeLLM(FakeClock()), requests(1), concurrency=2, request_rate=1.0)
    with pytest.raises(LlmxError, match="choose one"):
        BenchOptions(isl=4, osl=2, num_requests=1, concurrency=2, request_rate=1.0)
    with pytest.raises(LlmxError, match="--request-rate must be a positive"):
        BenchOptions(isl=4, osl=2, num_requests=1, request_rate=0.0)


class RealClockLLM(FakeLLM):
    """For run_benchmark, which times with time.perf_counter: the fake clock only orders the fake's own bookkeeping."""

    def __init__(self, **kwargs):
        super().__init__(FakeClock(), step_time=0.0, **kwargs)


def test_run_benchmark_builds_a_report_with_warmup_excluded():
    llm = RealClockLLM()
    options = BenchOptions(isl=12, osl=4, num_requests=5, warmup=2, seed=3)
    stages = []
    report = run_benchmark(llm, options, recipe="recipes/llama/cpu.yaml",
                           progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert stages[-1] == ("measured requests", 5, 5) and ("warmup requests", 2, 2) in stages
    assert report["schema"] == "llmx-bench/1"
    assert len(llm.added_at) == 7  # 2 warmup + 5 measured
    m = report["metrics"]
    assert m["completed_requests"] == 5
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 20
    assert m["kv_cache"]["peak_use_fraction"] == pytest.approx(0.4)
    assert report["config"] == {"isl": 12, "osl": 4, "num_requests": 5, "concurrency": None, "request_rate": None,
                                "warmup": 2, "dataset": None, "dataset_hash": None, "seed": 3, "ignore_eos": True,
                                "kv_cache_tokens": None, "recipe": "recipes/llama/cpu.yaml"}
    assert report["engine"]["family"] == "llama" and report["engine"]["path"] == "fake-engine"
    assert {"device", "torch", "llmx", "python"} <= set(report["environment"])


def test_run_benchmark_refuses_requests_the_engine_cannot_hold():
    llm = RealClockLLM(max_seq_len=10)
    with pytest.raises(LlmxError, match=r"needs 8 input \+ 4 output tokens but the engine's max_seq_len is 10"):
        run_benchmark(llm, BenchOptions(isl=8, osl=4, num_requests=2, warmup=0))


def test_run_benchmark_with_a_dataset(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "abcdef", "output_len": 2}\n{"prompt": "xyz"}\n')
    report = run_benchmark(RealClockLLM(), BenchOptions(isl=99, osl=3, num_requests=None, warmup=1, dataset=data))
    m = report["metrics"]
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (9, 5)
    assert report["config"]["isl"] is None and report["config"]["dataset_hash"].startswith("sha256:")

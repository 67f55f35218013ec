"""GPU time of one kernel call without the Python launch cost: calls replayed from a CUDA graph.

`triton.testing.do_bench` times each call between CUDA events launched from Python. For a kernel that
runs for a few microseconds (every decode-size GEMM, norm and attention call), the wrapper's Python work
takes longer than the kernel, the GPU waits for the launch, and the figure is launch time, not kernel
time. In llmx's decode steps those launches replay from CUDA graphs, so what matters is GPU time: this
module captures `calls` launches in one graph and divides the replay time by `calls`.

Between calls the graph reads a buffer twice the L2's size, so every call reads its operands from HBM
as it would inside a forward pass (where each layer's weights are read once); the time of those reads,
measured by a graph of them alone, is subtracted. Reading, not writing, keeps the evicted lines clean:
a written buffer would leave the L2 full of dirty lines whose write-back the timed kernel would pay.

Used by `llmx build`'s tile tuning (kernels/tuning.py) and by the kernel benchmarks under measurements/.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def _graph_of(fn: Callable[[], object], calls: int, flush: torch.Tensor | None) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile, autotune and allocate outside the capture
            fn()
            if flush is not None:
                flush.sum()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            if flush is not None:
                flush.sum()
            fn()
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> list[float]:
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def graph_time_ms(fn: Callable[[], object], *, calls: int = 20, replays: int = 15,
                  cold_l2: bool = True) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one `fn()` call on the GPU, launch overhead excluded."""
    flush = _flush_buffer() if cold_l2 else None
    per_call = [t / calls for t in _replay_ms(_graph_of(fn, calls, flush), replays)]
    if flush is not None:
        flush_only = _flush_ms(calls, replays)
        per_call = [max(t - flush_only, 1e-6) for t in per_call]
    return _quantile(per_call, 0.5), _quantile(per_call, 0.2), _quantile(per_call, 0.8)


@functools.lru_cache(maxsize=1)
def _flush_buffer() -> torch.Tensor:
    """Twice the L2 cache, int32, on the current GPU."""
    l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return torch.zeros(2 * l2_bytes // 4, dtype=torch.int32, device="cuda")


@functools.lru_cache(maxsize=8)
def _flush_ms(calls: int, replays: int) -> float:
    """Milliseconds of one L2 flush inside a graph (measured once per call count)."""
    times = _replay_ms(_graph_of(lambda: None, calls, _flush_buffer()), replays)
    return _quantile([t / calls for t in times], 0.5)

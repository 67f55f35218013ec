"""Where a decode step's GPU time goes: kernel-by-kernel profile of an engine's decode steps.

    python measurements/profile_decode.py ENGINE --batch 1,64 --context 256 [--json out.json]

For each batch size: starts that many requests with --context-token prompts, runs their prefill, then
profiles --steps pure decode steps eagerly (torch.profiler, CUDA activity) and prints the GPU time per
kernel group per step (GEMMs, attention, norms, RoPE, KV write, activation, sampling, other), the
sum of kernel time, and the wall time of the same steps replayed through the decode CUDA graphs.
The gap between kernel time and graph step time is what the GPU spends between kernels (launch
latency inside the graph, tails) plus the host work the graph does not hide.

Kernel time is read from the profiler's CUDA events; eager launches do not change how long a kernel
runs, only the gaps between kernels, so the per-kernel figures hold for graph replay too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from llmx.bench.steps import KERNEL_GROUPS


def group_of(name: str) -> str:
    """The group of a kernel: the first of KERNEL_GROUPS whose pattern matches its lower-cased name."""
    lowered = name.lower()
    for group, pattern in KERNEL_GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def start_decoding(llm, batch: int, context: int, steps: int) -> None:
    """Add `batch` requests of `context` prompt tokens and step until every one is decoding."""
    from llmx.runtime.sequence import SamplingParams

    vocab = llm.engine.model.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=steps * 4 + 16, ignore_eos=True)
    for _ in range(batch):
        llm.add_request(torch.randint(10, vocab - 10, (context,), generator=gen).tolist(), params)
    # Prefill (possibly chunked over several steps) until every request has its first decoded token.
    decoded: dict[int, int] = {}
    for _ in range(256):
        for output in llm.step():
            decoded[output.request_id] = len(output.output_token_ids)
        if len(decoded) == batch and min(decoded.values()) >= 2:
            return
    raise SystemExit(f"batch {batch}: requests did not all reach decode; is the KV cache large enough?")


def profile_steps(llm, steps: int) -> dict[str, float]:
    """GPU microseconds per step by kernel name, over `steps` eager decode steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] += event.device_time / steps  # us
    return dict(per_kernel)


def host_ops(llm, steps: int, top: int) -> list[tuple[str, float, int]]:
    """(op, host microseconds per step, calls per step) of the `top` costliest host-side torch ops over
    `steps` graph-replayed decode steps: what the GPU waits for between two replays."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            llm.step()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / steps, e.count // steps) for e in rows]


def timed_steps(llm, steps: int) -> float:
    """Median wall milliseconds of one step (graph replay when the runner has graphs)."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        llm.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--batch", default="1,64", help="comma list of decode batch sizes")
    ap.add_argument("--context", type=int, default=256, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=10, help="decode steps profiled / timed")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per batch size")
    ap.add_argument("--json", help="write the per-kernel figures here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    from llmx.runtime.engine import LLM

    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        row = {}
        for eager in (True, False):
            llm = LLM(args.engine, enforce_eager=eager)
            start_decoding(llm, batch, args.context, 3 * args.steps)
            if eager:
                kernels = profile_steps(llm, args.steps)
                row["kernels_us"] = kernels
                row["eager_step_ms"] = timed_steps(llm, args.steps)
            else:
                row["graph_step_ms"] = timed_steps(llm, args.steps)
                row["host_ops_us"] = host_ops(llm, args.steps, args.top)
            llm.close()
            del llm
            torch.cuda.empty_cache()
        groups: dict[str, float] = defaultdict(float)
        for name, us in row["kernels_us"].items():
            groups[group_of(name)] += us
        row["groups_us"] = dict(groups)
        total = sum(groups.values())
        results[batch] = row
        print(f"\n== batch {batch}, context {args.context}: kernels {total / 1e3:.3f} ms/step, "
              f"graph step {row['graph_step_ms']:.3f} ms, eager step {row['eager_step_ms']:.3f} ms")
        for group, us in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"  {group:<13}{us:10.1f} us  {100 * us / total:5.1f}%")
        print("  host ops per graph step (self CPU us, calls):")
        for name, us, calls in row["host_ops_us"]:
            print(f"   {us:9.1f} us  x{calls:<4} {name[:100]}")
        print("  top kernels:")
        for name, us in sorted(row["kernels_us"].items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {us:9.1f} us  {name[:110]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

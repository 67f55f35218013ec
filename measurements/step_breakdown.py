"""Where a benchmark cell's time goes: per step type (prefill-only, mixed, decode-only), then per kernel group.

    python measurements/step_breakdown.py ENGINE --cell ISL/OSL/REQUESTS[/MAX_BATCH][:ADMISSION] [--cell ...]
        [--warmup 0] [--profile-steps 5] [--kv-cache-tokens N] [--json OUT]

e.g. `--cell 2048/2048/400/512 --cell 2048/2048/400/512:watermark --cell 128/128/4096/1024`: the cells run one
after another on one loaded engine, each on a fresh scheduler and prefix cache (bench/sweep.py's
fresh_scheduler), with at most MAX_BATCH sequences at once (at most the engine's max batch size) and the
scheduler's KV admission policy (runtime/scheduler.py).

1. Runs the cell as `llmx bench` does (every request at once) and records each step the runtime launches:
   its decode rows (one token that samples), its prompt tokens (chunks of prompts, or the recompute of a
   preempted sequence), the mean KV length its decode rows attend to, and the host time at which its tokens
   came back. A step's time is the gap between its tokens' return and the previous step's: while the device
   never idles that is the step's device time, and where the host is slower it is host time. Steps with prompt
   tokens and no decode rows are "prefill", with both "mixed", with decode rows only "decode". A prompt whose
   last chunk is one token counts as a decode row (rare, and the same work).
2. With --profile-steps N (default 5, 0 skips it): for each step type seen, one step of that type's median
   shape (decode rows at the median KV length; prompt tokens split evenly over the median number of prompt
   chunks) runs N times under torch.profiler after one unprofiled run, through the runner as the runtime
   calls it (decode steps replay the CUDA graphs where the engine has them). Kernels are grouped as
   profile_decode.py groups them (GEMM, attention, norm, RoPE, KV write, activation, quantization, sampling);
   on a CPU engine the groups are of torch ops, by their own CPU time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch

from llmx.bench.steps import StepRecorder, group_of, parse_cell, summarize, synthetic_step


def profile_step(runner, work, steps: int) -> dict:
    """Wall ms per step (median) and kernel (CPU: op) ms per step by group and by name, over `steps` runs."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(runner.device)

    runner.execute(work)  # warm-up: compilation, autotuning, allocator growth
    walls = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        runner.execute(work)
        sync()
        walls.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.execute(work)
        sync()
    per_name: dict[str, float] = defaultdict(float)
    if cuda:
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                per_name[event.name] += event.device_time / 1e3 / steps
    else:
        for event in prof.key_averages():
            per_name[event.key] += event.self_cpu_time_total / 1e3 / steps
    groups: dict[str, float] = defaultdict(float)
    for name, ms in per_name.items():
        groups[group_of(name)] += ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:12]
    return {"wall_ms": 1e3 * statistics.median(walls), "kernel_ms": sum(groups.values()),
            "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "top": top}



def run_cell(llm, cell: dict, *, warmup: int, profile_steps: int) -> dict:
    """One cell on a fresh scheduler: its bench figures, steps by type, and (profile_steps > 0) kernel groups."""
    from llmx.bench.runner import BenchOptions, run_benchmark
    from llmx.bench.sweep import fresh_scheduler

    fresh_scheduler(llm, max_batch=cell["max_batch"], admission=cell["admission"], watermark=cell["watermark"])
    recorder = StepRecorder(llm.runner)
    if warmup:  # other prompts (seed) than the measured ones, so that they leave no prefix-cache hits
        run_benchmark(llm, BenchOptions(isl=cell["isl"], osl=cell["osl"], num_requests=warmup, warmup=0, seed=1))
    recorder.steps.clear()
    report = run_benchmark(llm, BenchOptions(isl=cell["isl"], osl=cell["osl"], num_requests=cell["num_requests"],
                                             warmup=0))
    recorder.detach()
    measured = report["metrics"]
    result = {
        "cell": f"{cell['isl']}/{cell['osl']}, {cell['num_requests']} requests, max batch "
                f"{llm.scheduler.max_num_seqs}, {cell['admission']} admission"
                + (f" (watermark {cell['watermark']})" if cell["watermark"] is not None else ""),
        **cell, "max_batch": llm.scheduler.max_num_seqs,
        "bench": {key: measured[key] for key in ("output_throughput_tok_s", "duration_s", "num_preemptions")}
        | {"tpot_ms_mean": (measured.get("tpot_ms") or {}).get("mean"),
           "ttft_ms_p50": (measured.get("ttft_ms") or {}).get("p50"),
           "kv_peak_use_fraction": measured["kv_cache"]["peak_use_fraction"]},
        "total_steps": len(recorder.steps),
        "step_types": summarize(recorder.steps),
        "steps": [asdict(s) | {"kind": s.kind} for s in recorder.steps],
    }
    if profile_steps:
        runner = llm.runner
        result["profile"] = {}
        for kind, shape in result["step_types"].items():
            work = synthetic_step(shape, runner.block_size, runner.num_blocks)
            result["profile"][kind] = profile_step(runner, work, profile_steps) | {
                "decode_rows": int(shape["median_decode_rows"]), "prompt_tokens": int(shape["median_prompt_tokens"])}
    return result


def print_tables(result: dict, device: str, out=sys.stdout) -> None:
    metrics = result["bench"]
    print(f"\n== {result['cell']}: {metrics['output_throughput_tok_s']:,.0f} output tok/s, "
          f"{metrics['num_preemptions']} preemptions, {result['total_steps']} steps in {metrics['duration_s']:.2f} s",
          file=out)
    print(f"{'step type':<10}{'steps':>7}{'share':>8}{'mean ms':>9}{'rows':>7}{'prompt tok':>11}{'kv len':>8}"
          f"{'tok/s':>10}", file=out)
    for kind, s in result["step_types"].items():
        share = f"{100 * s['share']:.1f}%" if s["share"] is not None else "n/a"
        rate = f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] is not None else "n/a"
        print(f"{kind:<10}{s['steps']:>7}{share:>8}{s['mean_ms']:>9.2f}{s['median_decode_rows']:>7.0f}"
              f"{s['median_prompt_tokens']:>11.0f}{s['median_decode_kv_len']:>8.0f}{rate:>10}", file=out)
    for kind, p in result.get("profile", {}).items():
        what = "kernel" if device == "cuda" else "op"
        print(f"{kind} step of the median shape ({p['decode_rows']} rows + {p['prompt_tokens']} prompt tokens): "
              f"{p['wall_ms']:.2f} ms wall, {p['kernel_ms']:.2f} ms of {what} time", file=out)
        for group, ms in p["groups_ms"].items():
            share = 100 * ms / p["kernel_ms"] if p["kernel_ms"] > 0 else 0.0
            print(f"  {group:<14}{ms:9.3f} ms {share:5.1f}%", file=out)
        for name, ms in p["top"][:6]:
            print(f"    {ms:8.3f} ms  {name[:100]}", file=out)


def write_json(result: dict, path: Path) -> None:
    from llmx.common.jsonio import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dumps(result) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--cell", action="append", required=True, metavar="ISL/OSL/REQUESTS[/MAX_BATCH][:ADMISSION]",
                    help="a cell to run (repeat for several, on one loaded engine): requests all at once, at most "
                         "MAX_BATCH sequences at a time [default: the engine's max batch size], the scheduler's KV "
                         "admission policy reserve (default) or watermark")
    ap.add_argument("--warmup", type=int, default=0, help="requests run before each cell's measured ones")
    ap.add_argument("--profile-steps", type=int, default=5, help="profiled runs of each step type (0: none)")
    ap.add_argument("--kv-cache-tokens", type=int, help="KV-cache size in tokens [default: the runtime's]")
    ap.add_argument("--json", type=Path, help="write the figures here (rewritten after each cell)")
    args = ap.parse_args(argv)
    try:
        cells = [parse_cell(text) for text in args.cell]
    except ValueError as exc:
        ap.error(str(exc))
    if args.profile_steps < 0 or args.warmup < 0:
        ap.error("--profile-steps and --warmup must be at least 0")

    from llmx.runtime.engine import LLM

    llm = LLM(args.engine, kv_cache_tokens=args.kv_cache_tokens)
    built = llm.engine.build.max_batch_size
    for cell in cells:
        if cell["max_batch"] is not None and cell["max_batch"] > built:
            ap.error(f"--cell max batch {cell['max_batch']} exceeds the engine's max batch size {built}")
    stats = llm.stats()
    print(f"{args.engine} on {stats['device_name']}: KV cache {stats['kv_cache_tokens']:,} tokens", flush=True)
    result = {"engine": str(args.engine), "device": llm.device.type, "device_name": stats["device_name"],
              "kv_cache_tokens": stats["kv_cache_tokens"], "cells": []}
    for cell in cells:
        result["cells"].append(run_cell(llm, cell, warmup=args.warmup, profile_steps=args.profile_steps))
        print_tables(result["cells"][-1], llm.device.type)
        sys.stdout.flush()
        if args.json:
            write_json(result, args.json)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

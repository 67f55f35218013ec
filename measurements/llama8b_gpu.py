"""Llama-3.1-8B-shaped engine (dummy weights) on one GPU: decode and throughput scenarios in one
process, each figure next to its roofline. Writes one llmx-bench/1 report per scenario.

    python measurements/llama8b_gpu.py ENGINE_DIR OUT_DIR [--scenarios bs1_128,tput_128_128,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmx.bench.runner import BenchOptions, run_benchmark
from llmx.runtime.engine import LLM

# HBM bandwidth for the roofline, TB/s: the H100's is its measured device-to-device copy; the H200's is its
# datasheet figure (not measured here), so H200 percentages are against a higher bar than the H100's.
HBM_TBPS = {"H100": 3.0, "H200": 4.8}


def hbm_tbps() -> float:
    import torch

    name = torch.cuda.get_device_name()
    return next((tbps for gpu, tbps in HBM_TBPS.items() if gpu in name), HBM_TBPS["H100"])
SCENARIOS = {
    "bs1_128_128": BenchOptions(isl=128, osl=128, num_requests=3, concurrency=1, warmup=1),
    "bs1_2048_128": BenchOptions(isl=2048, osl=128, num_requests=3, concurrency=1, warmup=1),
    "bs8_128_128": BenchOptions(isl=128, osl=128, num_requests=24, concurrency=8, warmup=8),
    "bs32_128_128": BenchOptions(isl=128, osl=128, num_requests=96, concurrency=32, warmup=32),
    "bs64_128_128": BenchOptions(isl=128, osl=128, num_requests=192, concurrency=64, warmup=64),
    "tput_128_128": BenchOptions(isl=128, osl=128, num_requests=1024, warmup=8),
    "tput_128_128_2k": BenchOptions(isl=128, osl=128, num_requests=2048, warmup=8),
    "tput_128_128_4k": BenchOptions(isl=128, osl=128, num_requests=4096, warmup=8),
    "tput_2048_128": BenchOptions(isl=2048, osl=128, num_requests=256, warmup=4),
    "tput_128_2048": BenchOptions(isl=128, osl=2048, num_requests=256, warmup=0),
    "tput_2048_2048": BenchOptions(isl=2048, osl=2048, num_requests=256, warmup=0),
}


def weight_bytes(engine_dir: Path) -> int:
    return sum(p.stat().st_size for p in engine_dir.glob("rank*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("out")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (to measure what they buy)")
    ap.add_argument("--sync-steps", action="store_true", help="no steps queued ahead (to measure what they buy)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    llm = LLM(args.engine, enforce_eager=args.eager, async_steps=not args.sync_steps)
    print(f"engine loaded in {time.perf_counter() - t0:.1f} s; KV cache {llm.stats()['kv_cache_tokens']} tokens")
    wbytes = weight_bytes(Path(args.engine))
    roofline = hbm_tbps() * 1e12 / wbytes
    for name in args.scenarios.split(","):
        report = run_benchmark(llm, SCENARIOS[name])
        m = report["metrics"]
        (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
        line = {k: m.get(k) for k in ("output_throughput_tok_s", "request_throughput_rps", "ttft_ms", "tpot_ms", "num_preemptions")}
        tpot = (m.get("tpot_ms") or {}).get("mean")
        extra = f"  decode {1000 / tpot:.1f} tok/s = {100 * 1000 / tpot / roofline:.0f}% of {roofline:.0f} roofline" if tpot else ""
        print(f"{name}: {json.dumps(line, default=str)}{extra}", flush=True)


if __name__ == "__main__":
    main()

"""The int4 decode kernels of one Llama-3.1-8B layer at batch 1, launched for a profiler (no timing here).

    ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 3 --launch-count 3 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis --section SourceCounters \\
        python3 measurements/int4_m1_launches.py

Launches, --rounds times (default 3; the first round compiles): the gated gate_up GEMV (silu(gate) * up with
down's input scale, [28672, 4096] weights), the down GEMV through w4a16_matmul ([4096, 14336]) and the gated
tensor-core decode kernel on the gate_up weights, for comparison (on Hopper only). Inputs as in
kernels_int4_decode.py: random int4 weights, group size 128, bf16.
BENCHMARKS.md has what ncu said of them on the H100.
"""

from __future__ import annotations

import argparse

import torch
from kernels_int4_decode import SHAPES, decode_case  # this folder's per-kernel benchmark: same inputs

from llmx.kernels import w4a16_mma_decode as mma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="launches of each kernel (default 3)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("int4_m1_launches.py launches GPU kernels: run it on a machine with a CUDA GPU.")
    g = torch.Generator().manual_seed(0)
    # M = 1: `before` is the gated GEMV for gate_up and w4a16_matmul's GEMV for down; `run` the decode kernel.
    gated_gemv, gated_mma, _ = decode_case(*SHAPES["gate_up"][:2], 1, SHAPES["gate_up"][2], g)
    down_gemv, _, _ = decode_case(*SHAPES["down"][:2], 1, SHAPES["down"][2], g)
    hopper = mma.mma_decode_available(torch.bfloat16)  # the tensor-core decode kernel needs wgmma
    for _ in range(args.rounds):
        gated_gemv()
        down_gemv()
        if hopper:
            gated_mma()
    torch.cuda.synchronize()
    print(f"launched {3 if hopper else 2} kernels x {args.rounds} rounds on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()

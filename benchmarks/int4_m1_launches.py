"""The int4 decode kernels of one Llama-3.1-8B layer at batch 1, launched for a profiler (no timing here).

    ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 3 --launch-count 3 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \\
        --section LaunchStats --section MemoryWorkloadAnalysis --section SourceCounters \\
        python3 benchmarks/int4_m1_launches.py

Launches, --rounds times (default 3; the first round compiles): the gated gate_up GEMV (silu(gate) * up with
down's input scale, [28672, 4096] weights), the down GEMV through w4a16_gemm ([4096, 14336]) and the gated
tensor-core decode kernel on the gate_up weights, for comparison (on Hopper only). Random int4 weights, group
size 128, bf16.
BENCHMARKS.md (ninth session) has what ncu said of them on the H100.
"""

from __future__ import annotations

import argparse

import torch

from llmx.kernels import w4a16_mma_decode as mma
from llmx.kernels.w4a16_gemm import w4a16_gemm
from llmx.kernels.w4a16_gemv_gated import w4a16_gemv_gated

GROUP = 128


def _weights(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight uint8 [n, k / 2], bf16 group scales [n, k / GROUP]) on the GPU."""
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(n, k // GROUP, generator=g) * 0.02
    return qweight.cuda(), scales.to(device="cuda", dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="launches of each kernel (default 3)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("int4_m1_launches.py launches GPU kernels: run it on a machine with a CUDA GPU.")
    g = torch.Generator().manual_seed(0)
    gate_up, gate_up_scales = _weights(28672, 4096, g)
    down, down_scales = _weights(4096, 14336, g)
    x = torch.randn(1, 4096, generator=g).to(device="cuda", dtype=torch.bfloat16)
    x_down = torch.randn(1, 14336, generator=g).to(device="cuda", dtype=torch.bfloat16)
    down_input_scale = (torch.rand(14336, generator=g) + 0.5).to(device="cuda", dtype=torch.bfloat16)
    hopper = mma.mma_decode_available(torch.bfloat16)  # the tensor-core decode kernel needs wgmma
    for _ in range(args.rounds):
        w4a16_gemv_gated(x, gate_up, gate_up_scales, GROUP, None, None, down_input_scale)
        w4a16_gemm(x_down, down, down_scales, GROUP)
        if hopper:
            mma.launch_w4a16_mma_decode(x, gate_up, gate_up_scales, GROUP, None, None, None, gated=True,
                                        out_scale=down_input_scale)
    torch.cuda.synchronize()
    print(f"launched {3 if hopper else 2} kernels x {args.rounds} rounds on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()

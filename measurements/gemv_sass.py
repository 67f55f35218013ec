"""Instruction mix of the int4 GEMV's K loop on Hopper, compiled on any machine (no GPU needed).

    python measurements/gemv_sass.py [--block-n 16] [--block-k 1024] [--warps 4] [--stages 3] [--rows 1]
                                   [--pre-scale] [--gated] [--sass out.sass]

At decode sizes the GEMV (kernels/w4a16_gemv.py) is bound by instruction issue more than by HBM (it takes the
same time on the H200 as on the H100: BENCHMARKS.md). This compiles it for sm_90 with the Triton installed
here (its bundled ptxas and nvdisasm), finds the K loop in the SASS (the block that ends in the backward
branch), and prints the loop's instructions by opcode and per weight, for one thread and one iteration. It is
a proxy for changes to the loop, not a timing: check a candidate on the GPU with kernels_gemm.py --gemv.
Arguments get the divisibility-by-16 hints the runtime's launches get (pointers, N, K, strides; not the
nibble mask, 15).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmx.kernels import w4a16_gemv
from llmx.kernels._triton_util import pin_fp_fusion

# The kernel's runtime arguments in order, and those the launches specialise as multiples of 16.
ARGS = {"x_ptr": "*i32", "qw_ptr": "*i32", "scales_ptr": "*i32", "pre_ptr": "*i32", "bias_ptr": "*bf16",
        "out_scale_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "K": "i32", "stride_xm": "i32",
        "stride_qn": "i32", "stride_sn": "i32", "stride_om": "i32", "nibble_mask": "i32"}
DIVISIBLE_BY_16 = list(ARGS)[:-1]


def compile_gemv(args: argparse.Namespace):
    pin_fp_fusion()  # as a launch would, before Triton compiles
    constants = dict(M_ROWS=args.rows, GROUP_SIZE=128, ACT=tl.bfloat16, GROUPED_SCALES=True,
                     HAS_PRE_SCALE=args.pre_scale, HAS_BIAS=False, GATED=args.gated, HAS_OUT_SCALE=False,
                     FOLD_OFFSET=w4a16_gemv.folds_offset(args.rows, torch.bfloat16) and not args.subtract_offset,
                     EVEN_K=True, BLOCK_N=args.block_n, BLOCK_K=args.block_k, SPLIT_K=1, NUM_STAGES=args.stages, PDL=True)
    signature = {**ARGS, **{name: "constexpr" for name in constants}}
    attrs = {(list(ARGS).index(name),): [["tt.divisibility", 16]] for name in DIVISIBLE_BY_16}
    source = ASTSource(fn=w4a16_gemv._w4a16_gemv_kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": args.warps, "num_stages": args.stages})


def _cuda_tool(name: str, cubin: bytes, *flags: str) -> str:
    """stdout of one of the CUDA binary tools bundled with triton, run on `cubin`."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> list[str]:
    return _cuda_tool("nvdisasm", cubin, "-c").splitlines()


def registers(cubin: bytes) -> int:
    """Registers per thread: with num_warps, what decides how many programs share an SM."""
    return int(re.search(r"REG:(\d+)", _cuda_tool("cuobjdump", cubin, "--dump-resource-usage")).group(1))


def loop_opcodes(sass: list[str]) -> collections.Counter:
    """Opcodes between the label a backward branch jumps to and that branch (the innermost loop)."""
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:", line.strip())}
    for end, line in enumerate(sass):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and labels.get(target.group(1), len(sass)) < end:
            start = labels[target.group(1)]
            break
    else:
        raise SystemExit("no backward branch found: the K loop was not recognised")
    ops: collections.Counter = collections.Counter()
    for line in sass[start:end + 1]:
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if op:
            ops[op.group(1)] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--block-n", type=int, default=16)
    ap.add_argument("--block-k", type=int, default=1024)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1, help="activation rows M (1..4)")
    ap.add_argument("--pre-scale", action="store_true", help="with an input scale (AWQ's o/down)")
    ap.add_argument("--gated", action="store_true", help="the gated variant (w4a16_gemv_gated)")
    ap.add_argument("--subtract-offset", action="store_true",
                    help="the loop that subtracts each weight's offset, which the GEMV runs at M >= 3, at --rows "
                         "rows (to compare it with the folded-offset loop of M <= 2)")
    ap.add_argument("--sass", help="also write the whole SASS here")
    args = ap.parse_args()
    cubin = compile_gemv(args).asm["cubin"]
    sass = disassemble(cubin)
    if args.sass:
        Path(args.sass).write_text("\n".join(sass))
    ops = loop_opcodes(sass)
    weights = args.block_n * args.block_k // (32 * args.warps)  # per thread per iteration
    total = sum(ops.values())
    print(f"triton {triton.__version__}, sm_90; block_n {args.block_n}, block_k {args.block_k}, {args.warps} warps, "
          f"{args.stages} stages, M = {args.rows}{', pre_scale' if args.pre_scale else ''}"
          f"{', gated' if args.gated else ''}{', subtract offset' if args.subtract_offset else ''}")
    print(f"K loop: {total} instructions per thread per iteration for {weights} weights x {args.rows} row(s): "
          f"{total / weights:.2f} per weight; {registers(cubin)} registers per thread")
    for op, count in ops.most_common():
        print(f"  {op:<10}{count:5d}  {count / weights:5.2f} per weight")


if __name__ == "__main__":
    main()

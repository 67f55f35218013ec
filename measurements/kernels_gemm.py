"""Quantized GEMM kernels on a CUDA GPU: correctness against the pure-torch references, then speed.

    python measurements/kernels_gemm.py                       # every kernel, Llama-3.1-8B shapes, M = 1..2048
    python measurements/kernels_gemm.py --kernels w4a16,bf16 --m 1,16
    python measurements/kernels_gemm.py --tune --tune-out tiles.json --json results.json
    python measurements/kernels_gemm.py --gemv                # the decode GEMV: M = 1, 2, 4 and a tile sweep
    TRITON_INTERPRET=1 python measurements/kernels_gemm.py --check-only --device cpu --dtype float16 \
        --nk 48,256 --m 2,17                                # correctness only, on CPU in Triton's interpreter

For each kernel, Llama-3.1-8B linear shape (N, K) and batch M, on fresh random data:
1. the kernel's output is compared with its `*_ref` (max |error| <= 2% of max |reference|); a mismatch
   is printed as FAIL and makes the script exit with status 1;
2. it is timed on the GPU alone: calls replayed from a CUDA graph, the L2 cache overwritten between
   calls so weights come from HBM as in a real forward pass (llmx/kernels/gpu_timing.py; launch overhead
   is excluded, as in llmx's graph-replayed decode steps);
3. TFLOP/s (2*M*N*K / time) and GB/s (unavoidable bytes / time: weights and their scales, activations
   in and output out, each once) are printed next to the roofline time max(FLOPs / compute ceiling,
   bytes / HBM bandwidth) and the fraction of it reached. torch's bf16 matmul runs on the same shapes.

What is timed: the whole call a linear layer makes: activation quantization included for int8_linear,
fp8 and w4a8 (int8_gemm is also timed alone on pre-quantized input). `w4a16` is what its Linears call,
w4a16_matmul, which runs the CUDA-core GEMV (w4a16_gemv) for M <= 4; `w4a16_gemv` and `w4a16_tc` time the GEMV
and the tensor-core kernel alone at those M.

--gemv prints one table for the GEMV at M = 1, 2, 4 on the four shapes (time, GB/s of int4 weights + bf16
scales, % of the HBM ceiling, speed-up over cuBLAS bf16 and over the tensor-core kernel), then the time of
each of a handful of tile configs (GEMV_SWEEP) at M = 1, to choose tuning.py's GEMV default from.

--check-only skips the timing: it checks every case against its reference (the GEMV also with a split-K tile
from GEMV_SWEEP), prints one `CHECK {json}` line per case and exits 1 on a mismatch. With --device cpu it needs
TRITON_INTERPRET=1 (kernels run in Triton's interpreter) and small shapes (--nk).

Ceilings: measured on an H100 SXM (bf16 786 TFLOP/s, FP8 torch._scaled_mm 1,413 per tensor and
1,257 row-wise, HBM 3.0 TB/s); INT8 uses the H100 SXM data-sheet 1,979 TOP/s (torch._int_mm reached
only 126). On another GPU pass its figures with --bf16-tflops/--fp8-tflops/--int8-tops/--hbm-tbps.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from llmx.kernels.tuning import TileConfig

SHAPES = {  # Llama-3.1-8B linear layers, (N, K) = (out_features, in_features)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
M_VALUES = (1, 16, 64, 256, 2048)
KERNELS = ("bf16", "w4a16", "w4a16_gemv", "w4a16_tc", "nvfp4", "int8", "int8_linear", "int8_wo", "fp8", "fp8_rowwise",
           "w4a8", "int_mm")
TUNABLE = {"w4a16": "w4a16", "w4a16_gemv": "w4a16", "nvfp4": "nvfp4", "int8": "int8", "int8_linear": "int8",
           "int8_wo": "int8_wo", "w4a8": "w4a8"}
GROUP_SIZE = 128
GEMV_M_VALUES = (1, 2, 4)
# GEMV tiles timed at M = 1 by --gemv: the default, then (block_n, block_k, num_warps) with 1 to 8 rows of
# 4 words per thread (block_n * block_k / (1024 * num_warps)), pipeline depth, and split-K.
GEMV_SWEEP = tuple(TileConfig(16, bn, bk, split_k=split, num_warps=warps, num_stages=stages)
                   for bn, bk, warps, split, stages in (
                       (16, 1024, 4, 1, 4), (16, 1024, 4, 1, 3), (16, 1024, 4, 1, 2), (16, 512, 4, 1, 4),
                       (16, 512, 2, 1, 4), (16, 256, 1, 1, 4), (16, 1024, 2, 1, 4), (32, 512, 4, 1, 4),
                       (32, 512, 2, 1, 4), (64, 256, 4, 1, 4), (32, 1024, 4, 1, 4), (16, 1024, 4, 2, 4)))


@dataclass
class Ceilings:
    bf16_tflops: float = 786.0
    fp8_tflops: float = 1413.0
    fp8_rowwise_tflops: float = 1257.0
    int8_tops: float = 1979.0
    hbm_tbps: float = 3.0


@dataclass
class Case:
    run: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor] | None  # None: the baseline itself
    bytes: int
    peak_tflops: float


def make_case(kernel: str, m: int, n: int, k: int, ceil: Ceilings, device: str = "cuda",
              dtype: torch.dtype = torch.bfloat16, config: TileConfig | None = None) -> Case | None:
    """Fresh random inputs for one kernel and shape; None where the kernel does not apply. `config`: the
    w4a16_gemv tiles (else its default). (device and dtype let the tests run this plumbing in Triton's
    interpreter on CPU in float16.)"""
    from llmx.kernels import (fp8_gemm, int8_gemm, nvfp4_gemm, quantize_act, tuning, w4a16_dispatch, w4a16_format,
                              w4a16_gemm, w4a16_gemv)

    dev, bf16 = device, dtype
    x = torch.randn(m, k, device=dev, dtype=bf16)
    act_bytes = 2 * m * k + 2 * m * n  # 16-bit activations in, 16-bit output out
    if kernel == "bf16":
        w = torch.randn(n, k, device=dev, dtype=bf16) * 0.02
        return Case(lambda: torch.nn.functional.linear(x, w), None, 2 * n * k + act_bytes, ceil.bf16_tflops)
    if kernel in ("w4a16", "w4a16_gemv", "w4a16_tc", "w4a8"):
        if kernel in ("w4a16_gemv", "w4a16_tc") and m > tuning.GEMV_MAX_M:
            return None  # no GEMV there: w4a16 is the tensor-core kernel at that M
        qweight = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        scales = (torch.rand(n, k // GROUP_SIZE, device=dev) * 0.01 + 1e-3).to(bf16)
        wbytes = n * k // 2 + 2 * n * (k // GROUP_SIZE)

        def reference():
            return w4a16_format.w4a16_gemm_ref(x, qweight, scales, GROUP_SIZE)

        if kernel == "w4a16":
            return Case(lambda: w4a16_dispatch.w4a16_matmul(x, qweight, scales, GROUP_SIZE), reference,
                        wbytes + act_bytes, ceil.bf16_tflops)
        if kernel == "w4a16_gemv":
            return Case(lambda: w4a16_gemv.w4a16_gemv(x, qweight, scales, GROUP_SIZE, config=config), reference,
                        wbytes + act_bytes, ceil.bf16_tflops)
        if kernel == "w4a16_tc":  # the tensor-core GEMM itself, at an M where w4a16_matmul would not run it
            return Case(lambda: w4a16_gemm.launch_w4a16_tensor_core(x, qweight, scales, GROUP_SIZE, None, None, None),
                        reference, wbytes + act_bytes, ceil.bf16_tflops)
        input_scale = (x.float().abs().amax() / 448.0).reshape(())
        return Case(lambda: fp8_gemm.w4a8_gemm(x, qweight, scales, GROUP_SIZE, input_scale),
                    lambda: fp8_gemm.w4a8_gemm_ref(x, qweight, scales, GROUP_SIZE, input_scale),
                    wbytes + act_bytes, ceil.fp8_tflops)
    if kernel == "nvfp4":
        qweight, block_scales, global_scale = nvfp4_gemm.quantize_nvfp4_ref(torch.randn(n, k, device=dev) * 0.02)
        return Case(lambda: nvfp4_gemm.nvfp4_gemm(x, qweight, block_scales, global_scale),
                    lambda: nvfp4_gemm.nvfp4_gemm_ref(x, qweight, block_scales, global_scale),
                    n * k // 2 + n * k // 16 + act_bytes, ceil.bf16_tflops)
    if kernel in ("int8", "int8_linear", "int8_wo", "int_mm"):
        wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        ws = torch.rand(n, device=dev) * 1e-3 + 1e-4
        if kernel == "int8_wo":
            return Case(lambda: int8_gemm.int8_wo_gemm(x, wq, ws), lambda: int8_gemm.int8_wo_gemm_ref(x, wq, ws),
                        n * k + 4 * n + act_bytes, ceil.bf16_tflops)
        if kernel == "int8_linear":
            return Case(lambda: int8_gemm.int8_linear(x, wq, ws), lambda: int8_gemm.int8_linear_ref(x, wq, ws),
                        n * k + 4 * n + act_bytes, ceil.int8_tops)
        xq, xs = quantize_act.quantize_int8_ref(x)
        int8_bytes = n * k + 4 * n + m * k + 4 * m + 2 * m * n
        if kernel == "int8":
            return Case(lambda: int8_gemm.int8_gemm(xq, xs, wq, ws, bf16),
                        lambda: int8_gemm.int8_gemm_ref(xq, xs, wq, ws, bf16), int8_bytes, ceil.int8_tops)
        if m <= 16:  # torch._int_mm needs M > 16
            return None
        return Case(lambda: torch._int_mm(xq, wq.t()), None, n * k + m * k + 4 * m * n, ceil.int8_tops)
    if kernel in ("fp8", "fp8_rowwise"):
        rowwise = kernel == "fp8_rowwise"
        wq, ws = fp8_gemm.quantize_fp8_weight_ref(torch.randn(n, k, device=dev) * 0.02, per_channel=rowwise)
        input_scale = None if rowwise else (x.float().abs().amax() / 448.0).reshape(())
        return Case(lambda: fp8_gemm.fp8_linear(x, wq, ws, input_scale),
                    lambda: fp8_gemm.fp8_linear_ref(x, wq, ws, input_scale),
                    n * k + 4 * ws.numel() + act_bytes, ceil.fp8_rowwise_tflops if rowwise else ceil.fp8_tflops)
    raise SystemExit(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


def check(case: Case) -> tuple[bool, float]:
    """(output matches the reference, max |error| relative to max |reference|)."""
    if case.reference is None:
        return True, 0.0
    out, ref = case.run().float(), case.reference().float()
    rel = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    return rel <= 2e-2, rel


def gemv_report(shapes: dict[str, tuple[int, int]], ceil: Ceilings) -> tuple[list[dict], int]:
    """--gemv: w4a16_gemv at GEMV_M_VALUES against cuBLAS bf16 and the tensor-core kernel, then the GEMV_SWEEP
    tiles at M = 1. Prints two tables; returns (rows, number of results that did not match the reference)."""
    from llmx.kernels.gpu_timing import graph_time_ms

    failures = 0

    def timed(kernel: str, m: int, n: int, k: int, config: TileConfig | None = None) -> float:
        nonlocal failures
        case = make_case(kernel, m, n, k, ceil, config=config)
        ok, rel_err = check(case)
        if not ok:
            failures += 1
            print(f"FAIL: {kernel} M={m} N={n} K={k} {config}: relative error {rel_err:.1e}", flush=True)
        return graph_time_ms(case.run)[0] * 1e3

    def weight_gbps(n: int, k: int, us: float) -> float:
        return (n * k // 2 + 2 * n * (k // GROUP_SIZE)) / (us * 1e-6) / 1e9

    rows = []
    print(f"\nw4a16_gemv, default tiles: GB/s of int4 weights + bf16 scales (group {GROUP_SIZE}), % of "
          f"{ceil.hbm_tbps:.1f} TB/s; bf16 = cuBLAS, tc = the tensor-core w4a16 kernel")
    print(f"{'shape':<9}{'M':>3}{'gemv us':>9}{'GB/s':>7}{'%HBM':>6}{'bf16 us':>9}{'vs bf16':>8}{'tc us':>8}"
          f"{'vs tc':>7}")
    for shape, (n, k) in shapes.items():
        for m in GEMV_M_VALUES:
            us, bf16_us, tc_us = (timed(kernel, m, n, k) for kernel in ("w4a16_gemv", "bf16", "w4a16_tc"))
            gbps = weight_gbps(n, k, us)
            rows.append({"table": "gemv", "shape": shape, "n": n, "k": k, "m": m, "us": us, "gbps": gbps,
                         "hbm_frac": gbps / (ceil.hbm_tbps * 1e3), "bf16_us": bf16_us, "tc_us": tc_us})
            print(f"{shape:<9}{m:>3}{us:>9.1f}{gbps:>7.0f}{gbps / (ceil.hbm_tbps * 10):>5.0f}%{bf16_us:>9.1f}"
                  f"{bf16_us / us:>7.2f}x{tc_us:>8.1f}{tc_us / us:>6.2f}x", flush=True)

    print("\nw4a16_gemv tiles at M = 1: us (% of HBM), * = fastest for the shape; rows/thread = "
          "block_n * block_k / (1024 * warps)")
    sweep = {cfg: {shape: timed("w4a16_gemv", 1, n, k, cfg) for shape, (n, k) in shapes.items()} for cfg in GEMV_SWEEP}
    best = {shape: min(sweep[cfg][shape] for cfg in GEMV_SWEEP) for shape in shapes}
    print(f"{'block_n block_k warps stages split':<36}{'rows':>5}" + "".join(f"{shape:>16}" for shape in shapes))
    for cfg in GEMV_SWEEP:
        cells = ""
        for shape, (n, k) in shapes.items():
            us = sweep[cfg][shape]
            rows.append({"table": "gemv_sweep", "config": cfg.to_dict(), "shape": shape, "n": n, "k": k, "m": 1,
                         "us": us, "gbps": weight_gbps(n, k, us)})
            cell = f"{us:.1f} ({weight_gbps(n, k, us) / (ceil.hbm_tbps * 10):.0f}%){'*' if us == best[shape] else ' '}"
            cells += f"{cell:>16}"
        label = f"{cfg.block_n:>7} {cfg.block_k:>7} {cfg.num_warps:>5} {cfg.num_stages:>6} {cfg.split_k:>5}"
        print(f"{label:<36}{cfg.block_n * cfg.block_k // (1024 * cfg.num_warps):>5}{cells}", flush=True)
    return rows, failures


def tune(kernels: list[str], m_values: list[int], path: str | None) -> None:
    from llmx.kernels import tuning

    tables = []
    for name in sorted({TUNABLE[k] for k in kernels if k in TUNABLE}):
        print(f"tuning {name} ...", flush=True)
        for n, k in SHAPES.values():
            # The (kernel, M) entries serving each M bucket: w4a16's decode buckets hold the GEMV's tiles.
            timed = {entry for m in m_values
                     for entry in tuning.bucket_kernels(name, tuning.m_bucket(m), k, GROUP_SIZE)}
            for kernel, m in sorted(timed):
                tables.append(tuning.autotune(kernel, [(n, k)], [m], log=lambda s: print("  " + s)))
    table = tuning.merge_tables(*tables)
    tuning.load_tuned(table)
    if path:
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
        print(f"tuned table written to {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {','.join(KERNELS)}")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma list of batch sizes M")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from {','.join(SHAPES)}")
    p.add_argument("--tune", action="store_true", help="autotune tile configs first (minutes)")
    p.add_argument("--tune-out", help="write the tuned table (engine.json's gemm_tiles) to this file")
    p.add_argument("--tiles", help="load a tuned table from this JSON file instead of tuning")
    p.add_argument("--json", help="write every measured row to this file")
    p.add_argument("--gemv", action="store_true", help="only the decode GEMV report: M = 1, 2, 4 and a tile sweep")
    p.add_argument("--check-only", action="store_true", help="check every case against its reference, no timing")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: only with --check-only under TRITON_INTERPRET=1")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="activation dtype")
    p.add_argument("--nk", help="one N,K shape instead of --shapes (e.g. 48,256 for the interpreter)")
    for field, default in vars(Ceilings()).items():
        p.add_argument("--" + field.replace("_", "-"), type=float, default=default)
    args = p.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    m_values = [int(v) for v in args.m.split(",") if v]
    if args.nk:
        try:
            n, k = (int(v) for v in args.nk.split(","))
        except ValueError:
            p.error(f"--nk {args.nk!r}: give N,K as two whole numbers, e.g. 48,256")
        shapes = {f"{n}x{k}": (n, k)}
    else:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",") if name}
    if args.check_only:
        return check_only(kernels, m_values, shapes, args.device, getattr(torch, args.dtype))
    if args.device != "cuda":
        p.error("--device cpu only checks (--check-only): timings on the interpreter mean nothing")

    if not torch.cuda.is_available():
        print("kernels_gemm.py measures CUDA kernels and needs an NVIDIA GPU; none is visible here.", file=sys.stderr)
        return 2
    try:
        import triton.testing
    except ImportError:
        print("kernels_gemm.py needs the `triton` package (pip install 'llmx[gpu]').", file=sys.stderr)
        return 2
    from llmx.kernels import tuning
    from llmx.kernels.gpu_timing import graph_time_ms

    ceil = Ceilings(**{f: getattr(args, f) for f in vars(Ceilings())})
    if args.tiles:
        with open(args.tiles) as f:
            tuning.load_tuned(json.load(f))
    elif args.tune:
        tune(kernels, m_values, args.tune_out)

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings: bf16 {ceil.bf16_tflops:.0f} TFLOP/s, fp8 {ceil.fp8_tflops:.0f} per-tensor / "
          f"{ceil.fp8_rowwise_tflops:.0f} row-wise, int8 {ceil.int8_tops:.0f} TOP/s, HBM {ceil.hbm_tbps:.1f} TB/s")
    if args.gemv:
        rows, failures = gemv_report(shapes, ceil)
        return _finish(args, props, ceil, rows, failures)
    header = (f"{'kernel':<12}{'shape':<9}{'M':>6}{'us':>10}{'TFLOP/s':>9}{'GB/s':>8}{'roof us':>9}"
              f"{'%roof':>7}{'vs bf16':>8}{'bound':>7}  check")
    print(header)
    rows, failures, bf16_us = [], 0, {}
    for shape, (n, k) in shapes.items():
        for m in m_values:
            for kernel in (["bf16"] if "bf16" in kernels else []) + [kk for kk in kernels if kk != "bf16"]:
                case = make_case(kernel, m, n, k, ceil)
                if case is None:
                    continue
                ok, rel_err = check(case)
                failures += not ok
                ms = graph_time_ms(case.run)[0]
                us = ms * 1e3
                flops = 2.0 * m * n * k
                compute_us = flops / (case.peak_tflops * 1e12) * 1e6
                memory_us = case.bytes / (ceil.hbm_tbps * 1e12) * 1e6
                roof_us = max(compute_us, memory_us)
                if kernel == "bf16":
                    bf16_us[(shape, m)] = us
                base = bf16_us.get((shape, m))
                row = {"kernel": kernel, "shape": shape, "n": n, "k": k, "m": m, "us": us,
                       "tflops": flops / (us * 1e-6) / 1e12, "gbps": case.bytes / (us * 1e-6) / 1e9,
                       "roofline_us": roof_us, "roofline_frac": roof_us / us,
                       "bound": "memory" if memory_us >= compute_us else "compute",
                       "speedup_vs_bf16": base / us if base else None, "rel_err": rel_err, "ok": ok}
                rows.append(row)
                print(f"{kernel:<12}{shape:<9}{m:>6}{us:>10.1f}{row['tflops']:>9.1f}{row['gbps']:>8.0f}"
                      f"{roof_us:>9.1f}{100 * row['roofline_frac']:>6.0f}%"
                      f"{(f'{base / us:.2f}x' if base else '-'):>8}{row['bound']:>7}  "
                      f"{'ok' if ok else 'FAIL'} ({rel_err:.1e})", flush=True)
    return _finish(args, props, ceil, rows, failures)


def check_only(kernels: list[str], m_values: list[int], shapes: dict[str, tuple[int, int]], device: str,
               dtype: torch.dtype) -> int:
    """--check-only: every case against its reference, one `CHECK {json}` line each; 1 if any mismatched or raised."""
    failures = 0
    for shape, (n, k) in shapes.items():
        for m in m_values:
            for kernel in kernels:
                for config in (None, GEMV_SWEEP[-1]) if kernel == "w4a16_gemv" else (None,):
                    row = {"kernel": kernel, "shape": shape, "m": m, "config": config and config.to_dict()}
                    try:
                        case = make_case(kernel, m, n, k, Ceilings(), device=device, dtype=dtype, config=config)
                        if case is None:
                            continue
                        row["ok"], row["rel_err"] = check(case)
                    except Exception as exc:  # noqa: BLE001  (reported on its line, counted as a failure)
                        row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
                    failures += not row["ok"]
                    print("CHECK " + json.dumps(row), flush=True)
    return 1 if failures else 0


def _finish(args: argparse.Namespace, props, ceil: Ceilings, rows: list[dict], failures: int) -> int:
    """Write --json, report mismatches; the exit status."""
    import triton

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                       "ceilings": vars(ceil), "rows": rows}, f, indent=1)
    if failures:
        print(f"{failures} kernel result(s) did not match the reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The int4 decode kernels against each other on the GPU: the tensor-core decode kernel (w4a16_mma_decode.py,
launched directly) and what w4a16_matmul runs without it (the CUDA-core GEMV at M <= 4, the tensor-core GEMM above).

    python measurements/kernels_int4_decode.py [--m 1,2,4,8,16] [--sweep [--sweep-m 1,32]] [--json out.json]

Llama-3.1-8B shapes, bf16, int4 group 128, graph-timed (kernels/gpu_timing.py), us per call and the share of
the H200's 4.8 TB/s that the weight and scale bytes would take at that time: qkv, o (with AWQ's pre_scale),
gate_up (gated: silu(gate) * up and down's scale in the same kernel), down, and the int4 LM head. Every output
is checked against the pure-torch reference first. `--sweep` also times every tile config of the decode kernel
at each of `--sweep-m`'s row counts (default 1) and prints the fastest per shape.
"""

from __future__ import annotations

import argparse
import json

import torch

from llmx.kernels import w4a16_mma_decode as mma
from llmx.kernels.gpu_timing import graph_time_ms
from llmx.kernels.tuning import candidate_configs, w4a16_uses_gemv
from llmx.kernels.w4a16_format import w4a16_gemm_ref
from llmx.kernels.w4a16_gemm import launch_w4a16_tensor_core
from llmx.kernels.w4a16_gemv import launch_w4a16_gemv
from llmx.kernels.w4a16_gemv_gated import w4a16_gemv_gated_ref

GROUP = 128
HBM_TB_S = 4.8
# name: (N, K, variant)
SHAPES = {"qkv": (6144, 4096, "plain"), "o": (4096, 4096, "pre_scale"), "gate_up": (28672, 4096, "gated"),
          "down": (4096, 14336, "plain"), "lm_head": (128256, 4096, "plain")}


def decode_case(n: int, k: int, m: int, variant: str, g: torch.Generator):
    """(before(), run(config=None), float32 reference) for one SHAPES entry at m rows: random int4 weights and bf16
    inputs on the GPU; `before` is what w4a16_matmul (or the gated GEMV) runs without the decode kernel, `run` the
    decode kernel launched directly (int4_m1_launches.py launches them for a profiler)."""
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda()
    scales = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.002).to(**bf16)
    x = torch.randn(m, k, generator=g).to(**bf16)
    pre = (torch.rand(k, generator=g) + 0.5).to(**bf16) if variant == "pre_scale" else None
    out_scale = (torch.rand(n // 2, generator=g) + 0.5).to(**bf16) if variant == "gated" else None
    gated = variant == "gated"
    if gated:
        def before():  # the gated GEMV, M <= 4
            return launch_w4a16_gemv(x, qweight, scales, GROUP, None, pre, None, gated=True, out_scale=out_scale)
        ref = w4a16_gemv_gated_ref(x.float(), qweight, scales.float(), GROUP, None, None, out_scale.float())
    else:
        def before():  # what w4a16_matmul runs where the decode kernel does not: the GEMV at M <= 4, else the GEMM
            launch = launch_w4a16_gemv if w4a16_uses_gemv(m, k, GROUP) else launch_w4a16_tensor_core
            return launch(x, qweight, scales, GROUP, None, pre, None)
        ref = w4a16_gemm_ref(x.float(), qweight, scales.float(), GROUP, None, None if pre is None else pre.float())

    def run(config=None):
        return mma.launch_w4a16_mma_decode(x, qweight, scales, GROUP, None, pre, config, gated=gated,
                                           out_scale=out_scale)
    return before, run, ref


def _row_counts(ap: argparse.ArgumentParser, flag: str, value: str) -> list[int]:
    """A comma-separated list of decode row counts the kernel runs (1..MMA_KERNEL_MAX_M), or exit 2 saying why."""
    try:
        ms = [int(v) for v in value.split(",")]
    except ValueError:
        ap.error(f"{flag} {value!r}: give whole row counts separated by commas, e.g. 1,4,16")
    if not all(1 <= m <= mma.MMA_KERNEL_MAX_M for m in ms):
        ap.error(f"{flag} {value!r}: every row count must lie in 1..{mma.MMA_KERNEL_MAX_M}")
    return ms


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _us(run) -> float:
    return graph_time_ms(run)[0] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16",
                    help="decode rows, comma-separated (1..64; above 16 the kernel pads the batch to 32 or 64)")
    ap.add_argument("--sweep", action="store_true", help="time every decode tile config (the tuner's candidates)")
    ap.add_argument("--sweep-m", default="1", help="the row counts of --sweep, comma-separated (default 1)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    ms = _row_counts(ap, "--m", args.m)
    sweep_ms = _row_counts(ap, "--sweep-m", args.sweep_m)
    g = torch.Generator().manual_seed(0)
    rows = []
    for m in ms:
        for name, (n, k, variant) in SHAPES.items():
            run_before, run, ref = decode_case(n, k, m, variant, g)
            before = None  # the gated GEMV stops at M = 4: above, gate_up ran unfused before this kernel
            if not (variant == "gated" and m > 4):
                y = run_before()
                before = (_us(run_before), _error(y, ref))
            y = run()
            after = (_us(run), _error(y, ref))
            weight_bytes = n * k // 2 + 2 * n * k // GROUP
            row = {"m": m, "shape": name, "n": n, "k": k, "variant": variant,
                   "before_us": before and round(before[0], 2), "before_err": before and before[1],
                   "mma_us": round(after[0], 2), "mma_err": after[1],
                   "mma_hbm": round(weight_bytes / (after[0] * 1e-6) / (HBM_TB_S * 1e12), 3),
                   "default": mma.mma_decode_config(m, n, k).to_dict()}
            rows.append(row)
            print(f"M={m:2d} {name:8s} before {row['before_us'] or float('nan'):7.1f} us  mma {row['mma_us']:7.1f} us "
                  f"({100 * row['mma_hbm']:4.0f}% of HBM)  err before {row['before_err'] or 0:.1e} mma "
                  f"{row['mma_err']:.1e}  tiles {row['default']}", flush=True)
    sweep = {}
    for m in sweep_ms if args.sweep else ():
        for name, (n, k, variant) in SHAPES.items():
            _, run, ref = decode_case(n, k, m, variant, g)
            timed = []
            for cfg in candidate_configs("w4a16_mma_decode", m):
                try:
                    y = run(cfg)
                except Exception as exc:  # noqa: BLE001  (a config that does not fit is reported, not fatal)
                    print(f"sweep {name} {cfg.to_dict()}: {type(exc).__name__}: {exc}"[:200], flush=True)
                    continue
                err = _error(y, ref)
                timed.append((_us(lambda cfg=cfg: run(cfg)), cfg.to_dict(), err))
            timed.sort(key=lambda t: t[0])
            sweep[f"m{m}_{name}"] = timed
            for us, cfg, err in timed[:4]:
                print(f"sweep M={m} {name:8s} {us:7.1f} us  err {err:.1e}  {cfg}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()

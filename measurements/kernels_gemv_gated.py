"""The gated int4 GEMV (kernels/w4a16_gemv_gated.py) against the kernels it replaces, on the GPU.

    python measurements/kernels_gemv_gated.py [--m 1] [--json out.json]

Llama-3.1-8B shapes, bf16, int4 group 128, default tiles, graph-timed (kernels/gpu_timing.py): the MLP's steps
alone, then a whole decode layer without attention: unfused = add+norm, qkv, o, add+norm, gate_up,
silu_and_mul, down with AWQ's pre_scale (7 kernels); fused = the same with gate_up and silu_and_mul as one gated
GEMV that also applies down's scale, and down without it (6 kernels). Also prints registers and spills per
compiled GEMV variant.
"""

from __future__ import annotations

import argparse
import json

import torch

from llmx.kernels import activation, rms_norm, w4a16_gemv
from llmx.kernels.gpu_timing import graph_time_ms
from llmx.kernels.w4a16_gemv_gated import w4a16_gemv_gated

HIDDEN, INTER, QKV = 4096, 14336, 6144
GROUP = 128
EPS = 1e-5


class _Recorder:
    """Wraps the GEMV kernel so each launch's compiled kernel (registers, spills) is kept."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.compiled.append(compiled)
            return compiled
        return launch


def _int4(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda(),
            (torch.rand(n, k // GROUP, generator=g) * 0.02 + 0.002).to(torch.bfloat16).cuda())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=1, choices=range(1, 5), help="decode rows, 1..4 (the GEMV's range)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    m = args.m
    g = torch.Generator().manual_seed(0)
    w = {"qkv": _int4(QKV, HIDDEN, g), "o": _int4(HIDDEN, HIDDEN, g), "gate_up": _int4(2 * INTER, HIDDEN, g),
         "down": _int4(HIDDEN, INTER, g)}
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    stream = torch.randn(m, HIDDEN, generator=g).to(**bf16)
    delta = torch.randn(m, HIDDEN, generator=g).to(**bf16)
    norm_w = (torch.rand(HIDDEN, generator=g) + 0.5).to(**bf16)
    pre_o = (torch.rand(HIDDEN, generator=g) + 0.5).to(**bf16)
    pre_down = (torch.rand(INTER, generator=g) + 0.5).to(**bf16)
    attn = torch.randn(m, HIDDEN, generator=g).to(**bf16)
    act = torch.randn(m, INTER, generator=g).to(**bf16)

    steps = {
        "qkv": lambda: w4a16_gemv.w4a16_gemv(stream, *w["qkv"], GROUP),
        "o (pre_scale)": lambda: w4a16_gemv.w4a16_gemv(attn, *w["o"], GROUP, None, pre_o),
        "gate_up": lambda: w4a16_gemv.w4a16_gemv(stream, *w["gate_up"], GROUP),
        "gate_up, then silu_and_mul": lambda: activation.silu_and_mul(w4a16_gemv.w4a16_gemv(stream, *w["gate_up"],
                                                                                            GROUP)),
        "gate_up gated": lambda: w4a16_gemv_gated(stream, *w["gate_up"], GROUP),
        "gate_up gated, down's scale": lambda: w4a16_gemv_gated(stream, *w["gate_up"], GROUP, None, None, pre_down),
        "down (pre_scale)": lambda: w4a16_gemv.w4a16_gemv(act, *w["down"], GROUP, None, pre_down),
        "down (no pre_scale)": lambda: w4a16_gemv.w4a16_gemv(act, *w["down"], GROUP),
    }

    def layer(fused: bool):
        normed, summed = rms_norm.fused_add_rms_norm(delta, stream, norm_w, EPS)
        w4a16_gemv.w4a16_gemv(normed, *w["qkv"], GROUP)
        o = w4a16_gemv.w4a16_gemv(attn, *w["o"], GROUP, None, pre_o)
        normed, summed = rms_norm.fused_add_rms_norm(o, summed, norm_w, EPS)
        if fused:
            return w4a16_gemv.w4a16_gemv(w4a16_gemv_gated(normed, *w["gate_up"], GROUP, None, None, pre_down),
                                         *w["down"], GROUP)
        gated = activation.silu_and_mul(w4a16_gemv.w4a16_gemv(normed, *w["gate_up"], GROUP))
        return w4a16_gemv.w4a16_gemv(gated, *w["down"], GROUP, None, pre_down)

    recorder = _Recorder(w4a16_gemv._w4a16_gemv_kernel)
    w4a16_gemv._w4a16_gemv_kernel = recorder
    rows = []
    print(f"{torch.cuda.get_device_name()}, M = {m}, bf16, group {GROUP}, default tiles; us per call (graph-timed)")
    for name, fn in {**steps, "layer without attention, unfused (7 kernels)": lambda: layer(False),
                     "layer without attention, fused MLP (6 kernels)": lambda: layer(True)}.items():
        recorder.compiled.clear()
        fn()
        torch.cuda.synchronize()
        kernels = {(c.n_regs, c.n_spills) for c in recorder.compiled}
        median, low, high = graph_time_ms(fn, calls=20, replays=10)
        regs = ", ".join(f"{r} regs/{s} spills" for r, s in sorted(kernels))
        print(f"  {name:<48}{median * 1e3:8.1f} us  (p20 {low * 1e3:.1f}, p80 {high * 1e3:.1f})  {regs}")
        rows.append({"name": name, "us": median * 1e3, "p20_us": low * 1e3, "p80_us": high * 1e3,
                     "regs_spills": sorted(kernels)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "m": m, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""SwiGLU's gate_up projection and activation in one int4 GEMV: silu(gate) * up for a few decode rows.

`w4a16_gemv_gated(x [M, K], qweight [2I, K / 2], scales, group_size, bias=None, pre_scale=None, out_scale=None)`
returns silu(x W_gate^T) * (x W_up^T) [M, I] for a fused [gate | up] int4 weight (w4a16_gemv.py's storage format and
limits: M <= GEMV_MAX_M, K and the group size multiples of 8). Unfused this is the GEMV into a [M, 2I] buffer,
then silu_and_mul: a second kernel per layer. Where `tuning.int4_kernel_for` picks the tensor-core decode kernel
(w4a16_mma_decode.py: Hopper, 16-bit activations, M = 2..64), its gated variant runs instead, with the same
epilogue; where it picks the tensor-core GEMM, there is no gated kernel (w4a16_dispatch.w4a16_gated_matmul then
answers None).

Each program takes BLOCK_N / 2 gate rows and the matching up rows (gathered: the GEMV streams every row
separately anyway), so both halves of each output are in one program and every activation is computed
once. The result is rounded as silu_and_mul rounds after a 16-bit gate_up output, so it is bit-identical to
that pair of kernels. (Computing the activation as the down projection reads its input instead is slower: there
every program recomputes all of the intermediate activations.)

`out_scale` [I] multiplies each output before its last rounding: the next Linear's per-input-channel scale
(AWQ's pre_quant_scale on down_proj), which the down GEMV then skips. At batch 1 the GEMV is bound by its
instruction rate more than by HBM, and that scale costs the down GEMV a multiply per input on every program,
where here it is one multiply per output.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import check_launch_device
from llmx.kernels.activation import silu_and_mul_ref
from llmx.kernels.tuning import W4A16_MMA_DECODE, TileConfig, int4_kernel_for
from llmx.kernels.w4a16_format import check_int4_inputs, w4a16_gemm_ref
from llmx.kernels.w4a16_gemv import _w4a16_gemv_kernel, check_gemv_shape, launch_w4a16_gemv
from llmx.kernels.w4a16_mma_decode import launch_w4a16_mma_decode, mma_decode_available


def _check(x, qweight, scales, group_size, bias, pre_scale, out_scale, what, *, gemv: bool = False) -> None:
    """The inputs' shapes; with `gemv` (the kernel that runs is the GEMV) also the rows and sizes it runs."""
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, what)
    if gemv:
        check_gemv_shape(x, group_size, what, "run w4a16_matmul and silu_and_mul instead")
    n = qweight.shape[0]
    if n % 2:
        raise LlmxError(f"{what}: the weight must be [gate | up] with an even number of rows, got N={n}.")
    if out_scale is not None and tuple(out_scale.shape) != (n // 2,):
        raise LlmxError(f"{what}: out_scale must have shape [N / 2] = [{n // 2}], got {tuple(out_scale.shape)}.")


def w4a16_gemv_gated(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                     bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None,
                     out_scale: torch.Tensor | None = None, *, config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton: silu(gate) * up (* out_scale) [M, N / 2] of x (* pre_scale) [M, K] and the [gate | up] weight, one
    kernel. `config` overrides the GEMV tiles (split-K is never used here)."""
    kernel = int4_kernel_for(x.shape[0], x.shape[1], group_size,
                             mma_decode=mma_decode_available(x.dtype, x.device))
    mma_decode = kernel == W4A16_MMA_DECODE
    _check(x, qweight, scales, group_size, bias, pre_scale, out_scale, "w4a16_gemv_gated", gemv=not mma_decode)
    check_launch_device("w4a16_gemv_gated", _w4a16_gemv_kernel, x, qweight, scales, bias, pre_scale, out_scale)
    if mma_decode:
        return launch_w4a16_mma_decode(x, qweight, scales, group_size, bias, pre_scale, config, gated=True,
                                       out_scale=out_scale)
    return launch_w4a16_gemv(x, qweight, scales, group_size, bias, pre_scale, config, gated=True,
                             out_scale=out_scale)


def w4a16_gemv_gated_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                         bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None,
                         out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch: w4a16_gemm_ref, silu_and_mul_ref, then out_scale. Same contract as `w4a16_gemv_gated`."""
    _check(x, qweight, scales, group_size, bias, pre_scale, out_scale, "w4a16_gemv_gated_ref")
    y = silu_and_mul_ref(w4a16_gemm_ref(x, qweight, scales, group_size, bias, pre_scale))
    return y if out_scale is None else y * out_scale.to(y.dtype)

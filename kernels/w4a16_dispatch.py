"""The int4 (W4A16) Linear's entries on the GPU: each call goes to the kernel `tuning.int4_kernel_for` picks.

`w4a16_matmul(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` in x's dtype: the
tensor-core decode kernel (w4a16_mma_decode.py) for M = 2..64 rows of 16-bit activations on Hopper, the
CUDA-core GEMV (w4a16_gemv.py) for M <= 4, the tensor-core GEMM (w4a16_gemm.py) otherwise, within each kernel's
limits on K and the group size. `w4a16_gated_matmul` is the fused MLP's silu(gate) * up of a [gate | up] weight
(w4a16_gemv_gated.py) where the chosen kernel has a gated variant, None where it has not (the caller runs
w4a16_matmul and the activation). The weight format, the input checks and the pure-torch reference
`w4a16_gemm_ref` are w4a16_format.py's. This module imports the kernel modules; they import none of each other.
"""

from __future__ import annotations

import torch

from llmx.kernels import tuning, w4a16_gemm, w4a16_gemv, w4a16_gemv_gated, w4a16_mma_decode
from llmx.kernels._triton_util import check_launch_device
from llmx.kernels.tuning import TileConfig
from llmx.kernels.w4a16_format import check_int4_inputs


def int4_kernel(x: torch.Tensor, group_size: int) -> str:
    """The kernel `tuning.int4_kernel_for` picks for x [M, K] on its device, in its dtype."""
    m, k = x.shape
    return tuning.int4_kernel_for(m, k, group_size, mma_decode=w4a16_mma_decode.mma_decode_available(x.dtype, x.device))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None, *,
                 config: TileConfig | dict | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(qweight, scales)^T (+ bias) -> [M, N] in x's dtype, on the kernel picked for M, K and the
    group size. `config` overrides that kernel's tile configuration (else the tuned table, else its default)."""
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_matmul")
    check_launch_device("w4a16_matmul", w4a16_gemm.w4a16_kernel, x, qweight, scales, bias, pre_scale)
    kernel = int4_kernel(x, group_size)
    if kernel == tuning.W4A16_MMA_DECODE:
        return w4a16_mma_decode.launch_w4a16_mma_decode(x, qweight, scales, group_size, bias, pre_scale, config)
    if kernel == tuning.W4A16_GEMV:
        return w4a16_gemv.launch_w4a16_gemv(x, qweight, scales, group_size, bias, pre_scale, config)
    return w4a16_gemm.launch_w4a16_tensor_core(x, qweight, scales, group_size, bias, pre_scale, config)


def w4a16_gated_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None,
                       out_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """silu(gate) * up (* out_scale) [M, N / 2] of x [M, K] and a fused [gate | up] int4 weight in one kernel, or
    None where the kernel picked for these rows (the tensor-core GEMM) has no gated variant."""
    if int4_kernel(x, group_size) not in tuning.W4A16_GATED:
        return None
    return w4a16_gemv_gated.w4a16_gemv_gated(x, qweight, scales, group_size, bias, pre_scale, out_scale)

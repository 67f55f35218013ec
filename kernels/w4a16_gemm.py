"""W4A16 GEMM on the tensor cores: int4 group-wise weights (AWQ, GPTQ, int4_wo) times 16-bit (or fp32) activations.

The weight format and the pure-torch reference `w4a16_gemm_ref`: w4a16_format.py.
`w4a16_gemm(x [M, K], qweight, scales, group_size, bias=None, pre_scale=None) -> [M, N]` in x's dtype runs this
kernel at any M. The runtime calls w4a16_dispatch.w4a16_matmul instead, which hands decode rows to the GEMV
(w4a16_gemv.py) or the tensor-core decode kernel (w4a16_mma_decode.py) where `tuning.int4_kernel_for` says so.

Kernel: each program computes a [BLOCK_N, BLOCK_M] tile of out^T = W @ x^T. Putting the dequantised
weight on the left makes it the tensor cores' register operand (Hopper's wgmma reads only the left
operand from registers) and makes the batch, not N, the narrow side of the tile, so decode batches of
1..16 rows waste little work. Nibbles become floats with a magic-exponent bit trick (an OR and a
subtract) instead of int-to-float conversions, which run at a fraction of the FMA rate. The low and
high nibbles of a byte are kept apart, as two half-depth operands against the even and odd input
features. When a K tile sits inside one quantization group, the group scale multiplies the
[BLOCK_N, BLOCK_M] partial product instead of every weight.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import (finish_output, launch_grid, load_rows, new_output, output_tile, scale_groups,
                                      store_tile, tile_kwargs, weight_dot)
from llmx.kernels._triton_util import check_launch_device, jit, tl
from llmx.kernels.tuning import TileConfig
from llmx.kernels.w4a16_format import check_int4_inputs, int4_tuning_case


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, pre_scale: torch.Tensor | None = None, *,
               config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton W4A16 GEMM on the tensor cores: x [M, K] @ dequant(qweight, scales)^T (+ bias) -> [M, N] in x's dtype,
    at any M (w4a16_dispatch.w4a16_matmul picks the decode kernels where they are faster).

    `config` overrides the tile configuration (else the tuned table, else the heuristic default).
    """
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, "w4a16_gemm")
    check_launch_device("w4a16_gemm", w4a16_kernel, x, qweight, scales, bias, pre_scale)
    return launch_w4a16_tensor_core(x, qweight, scales, group_size, bias, pre_scale, config)


def launch_w4a16_tensor_core(x, qweight, scales, group_size, bias, pre_scale, config) -> torch.Tensor:
    """The tensor-core GEMM's launch for inputs already checked, at any M (w4a16_matmul sends it M > 16, or M > 4
    where the decode kernel does not run)."""
    m, k = x.shape
    n = qweight.shape[0]
    cfg = tuning.gemm_config("w4a16", m, n, k, config)
    block_k = _block_k_for_group(cfg.block_k, group_size)
    x = x if x.stride(1) == 1 else x.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous().to(x.dtype)
    y = new_output(m, n, x.dtype, x.device, cfg)
    w4a16_kernel[launch_grid(m, n, cfg)](
        x, qweight, scales, x if pre_scale is None else pre_scale.to(x.dtype).contiguous(),
        x if bias is None else bias.to(x.dtype).contiguous(), y,
        m, n, k, x.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, SCALE_AFTER_DOT=group_size % block_k == 0,
        HAS_PRE_SCALE=pre_scale is not None, HAS_BIAS=bias is not None,
        EVEN_K=k % (block_k * cfg.split_k) == 0, **tile_kwargs(cfg, block_k),
    )
    return finish_output(y, x.dtype)


def _block_k_for_group(block_k: int, group_size: int) -> int:
    """A K tile either inside one group (group % tile == 0) or made of whole power-of-two groups; at
    least 32 wide, so each nibble half of it is a 16-deep tensor-core K."""
    block_k = max(block_k, 32)
    if group_size % block_k == 0:
        return block_k
    if block_k % group_size == 0 and group_size & (group_size - 1) == 0:
        return block_k
    largest_pow2_divisor = group_size & -group_size
    if largest_pow2_divisor < 32:
        raise LlmxError(f"w4a16_gemm: group_size={group_size} must be a power of two or a multiple of 32 for the "
                        f"Triton kernel; use w4a16_gemm_ref or requantize with group size 32, 64 or 128.")
    return min(block_k, largest_pow2_divisor)


def w4a16_tuning_case(m: int, n: int, k: int, device: str = "cuda", group_size: int = 128,
                      dtype: torch.dtype = torch.bfloat16):
    """(run(config), check(output)) for `tuning.autotune`: random int4 inputs, launching this kernel."""
    return int4_tuning_case(launch_w4a16_tensor_core, m, n, k, device, group_size, dtype)


@jit
def _int4_to_float(nibbles, DTYPE: tl.constexpr):
    """uint8 nibbles (0..15) -> DTYPE values nibble - 8, exactly: OR the nibble into the mantissa of
    2^k (k = mantissa bits) and subtract 2^k + 8."""
    if DTYPE == tl.bfloat16:
        v = (nibbles.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - 136.0
    elif DTYPE == tl.float16:
        v = (nibbles.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0
    else:
        v = (nibbles.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    return v.to(DTYPE)


@jit
def w4a16_kernel(
    x_ptr, qw_ptr, scales_ptr, pre_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, HAS_PRE_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)  # packed byte j of a K tile: inputs 2j (low nibble) and 2j + 1 (high)

    # The low and high nibbles multiply the even and odd input features: two half-depth dots instead of
    # interleaving the nibbles back into K order, which would shuffle every weight through shared memory.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k0 = (pid_k * iters + it) * BLOCK_K
        packed = load_rows(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_j)[None, :], n_ok,
                           k0 // 2 + offs_j, K // 2, EVEN_K)
        # Contiguous [BLOCK_M, BLOCK_K] load, then even/odd columns apart in registers: the activation
        # tile is the small one at decode sizes, and strided loads would not vectorize.
        x = load_rows(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], m_ok, k0 + offs_k, K, EVEN_K)
        if HAS_PRE_SCALE:
            x = (x * tl.load(pre_ptr + k0 + offs_k, mask=k0 + offs_k < K, other=0.0)[None, :]).to(act)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
        w_low = _int4_to_float(packed & 0xF, act)  # [BLOCK_N, BLOCK_K // 2]
        w_high = _int4_to_float(packed >> 4, act)
        if SCALE_AFTER_DOT:
            # The whole K tile lies in group k0 // GROUP_SIZE: scale the partial product per row n.
            s = tl.load(scales_ptr + offs_n * stride_sn + tl.minimum(k0, K - 1) // GROUP_SIZE, mask=n_ok, other=0.0)
            part = weight_dot(w_low, x_even, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), act)
            acc += weight_dot(w_high, x_odd, part, act) * s.to(tl.float32)[:, None]
        else:
            # BLOCK_K spans BLOCK_K // GROUP_SIZE whole groups of GROUP_SIZE // 2 bytes: scale each weight.
            offs_g = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                        mask=n_ok[:, None] & (offs_g < K // GROUP_SIZE)[None, :], other=0.0)
            w_low = scale_groups(w_low, s, BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE // 2, act)
            w_high = scale_groups(w_high, s, BLOCK_N, BLOCK_K // GROUP_SIZE, GROUP_SIZE // 2, act)
            acc = weight_dot(w_high, x_odd, weight_dot(w_low, x_even, acc, act), act)

    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, True, HAS_BIAS, SPLIT_K)


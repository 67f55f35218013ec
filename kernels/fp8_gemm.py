"""FP8 GEMMs: FP8 weights x FP8 activations through torch._scaled_mm, and W4A8 (int4 weights, FP8 activations).

FP8 storage format (fp8, fp8_pc_pt checkpoints):
- `wq` float8_e4m3fn [N, K]; `w_scale` float32, a scalar (per tensor) or [N] (per output channel):
  w[n, k] = float(wq[n, k]) * w_scale (or * w_scale[n]).
- activations: `input_scale` a float32 scalar from calibration (static, per tensor), or None for
  dynamic per-token scales (absmax / 448, see quantize_act).
`fp8_linear(x, wq, w_scale, input_scale=None, bias=None) -> [M, N]` in x's dtype: quantize x (Triton),
then torch._scaled_mm(xq [M, K] row-major, wq.t() [K, N] column-major), whose cuBLASLt/CUTLASS kernels
reach 1,413 TFLOP/s per tensor and 1,257 row-wise on an H100. _scaled_mm needs K and N multiples of 16
(any M since torch 2.1). Row-wise scaling (per-token x or per-channel W) needs [M, 1] and [1, N] scales,
so a per-tensor scale on the other side is broadcast, and its output is produced in bfloat16.
`fp8_linear_ref` dequantises in float32 and runs anywhere.

W4A8 (w4a8_awq): weights in the int4 group-wise format of w4a16_gemm (qweight uint8 [N, K//2],
scales [N, K//group_size], optional AWQ pre_scale [K]); activations quantized to FP8 like fp8_linear:
    y = dequant_fp8(quantize_fp8(x * pre_scale, input_scale)) @ dequant_int4(qweight, scales)^T (+ bias).
`w4a8_gemm` runs it on FP8 tensor cores: int4 values are exact in e4m3, each K tile lies inside one
group, and the group scale multiplies the fp32 partial product, so no precision is lost beyond the
activation quantization. `w4a8_gemm_ref` is the pure-torch version.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import (finish_output, launch_grid, load_rows, new_output, output_tile, store_tile,
                                      tile_kwargs, tuning_case)
from llmx.kernels._triton_util import check_launch_device, jit, tl
from llmx.kernels.quantize_act import quantize_fp8, quantize_fp8_ref
from llmx.kernels.tuning import TileConfig
from llmx.kernels.w4a16_format import check_int4_inputs, dequantize_int4

FP8_MAX = 448.0
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_fp8_weight_ref(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (wq float8_e4m3fn [N, K], w_scale float32: scalar, or [N] when per_channel)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1) if per_channel else wf.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    wq = (wf / (scale[:, None] if per_channel else scale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return wq, scale


def _check_fp8(x, wq, w_scale, input_scale, bias, what):
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
        raise LlmxError(f"{what}: x must be a 2-D float16/bfloat16/float32 tensor [M, K], "
                        f"got {x.dtype} {tuple(x.shape)}.")
    k = x.shape[1]
    if wq.dtype != torch.float8_e4m3fn or wq.dim() != 2 or wq.shape[1] != k:
        raise LlmxError(f"{what}: weight must be float8_e4m3fn [N, K] with K={k}, got {wq.dtype} {tuple(wq.shape)}.")
    n = wq.shape[0]
    if w_scale.dtype != torch.float32 or (w_scale.numel() != 1 and tuple(w_scale.shape) != (n,)):
        raise LlmxError(f"{what}: weight_scale must be float32, a scalar or [N] = [{n}], "
                        f"got {w_scale.dtype} {tuple(w_scale.shape)}.")
    if input_scale is not None and (input_scale.numel() != 1 or input_scale.dtype != torch.float32):
        raise LlmxError(f"{what}: input_scale must be a float32 scalar (static per-tensor scale), "
                        f"got {input_scale.dtype} with {input_scale.numel()} elements.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise LlmxError(f"{what}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")


def fp8_linear_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch: quantize x like fp8_linear, dequantise both operands in float32, multiply, cast."""
    _check_fp8(x, wq, w_scale, input_scale, bias, "fp8_linear_ref")
    xq, xs = quantize_fp8_ref(x, input_scale)
    xd = xq.float() * (xs[:, None] if xs.numel() > 1 else xs.reshape(()))
    wd = wq.float() * (w_scale[:, None] if w_scale.numel() > 1 else w_scale.reshape(()))
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               fast_accum: bool = False) -> torch.Tensor:
    """FP8 linear x [M, K] -> [M, N] in x's dtype via Triton quantization + torch._scaled_mm.

    fast_accum: let the tensor cores accumulate without periodic fp32 promotion (faster, less exact at
    large K).
    """
    _check_fp8(x, wq, w_scale, input_scale, bias, "fp8_linear")
    m, k = x.shape
    n = wq.shape[0]
    if k % 16 or n % 16:
        raise LlmxError(f"fp8_linear: torch._scaled_mm needs K and N multiples of 16, got K={k}, N={n}; "
                        f"exclude this layer from FP8 quantization.")
    xq, xs = quantize_fp8(x, input_scale)
    w_t = wq.t()  # [K, N] column-major view of the row-major weight: what _scaled_mm wants, no copy
    if xs.numel() == 1 and w_scale.numel() == 1:
        out_dtype = x.dtype
        fused_bias = bias.to(out_dtype) if bias is not None and out_dtype != torch.float32 else None
        y = torch._scaled_mm(xq, w_t, scale_a=xs.reshape(()), scale_b=w_scale.reshape(()), bias=fused_bias,
                             out_dtype=out_dtype, use_fast_accum=fast_accum)
    else:
        fused_bias = None
        scale_a = xs.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = w_scale.reshape(1, -1).expand(1, n).contiguous()
        y = torch._scaled_mm(xq, w_t, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                             use_fast_accum=fast_accum).to(x.dtype)
    if bias is not None and fused_bias is None:
        y = y + bias.to(y.dtype)
    return y


def _check_w4a8(x, qweight, scales, group_size, input_scale, bias, pre_scale, what):
    check_int4_inputs(x, qweight, scales, group_size, bias, pre_scale, what)
    if group_size % 32:
        raise LlmxError(f"{what}: group_size={group_size} must be a multiple of 32 dividing K={x.shape[1]}; "
                        f"check the checkpoint's quantization.group_size.")
    if input_scale is not None and (input_scale.numel() != 1 or input_scale.dtype != torch.float32):
        raise LlmxError(f"{what}: input_scale must be a float32 scalar, got {input_scale.dtype} "
                        f"with {input_scale.numel()} elements.")


def w4a8_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                  input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch W4A8: FP8-quantize x (after pre_scale), dequantise both in float32, multiply, cast."""
    _check_w4a8(x, qweight, scales, group_size, input_scale, bias, pre_scale, "w4a8_gemm_ref")
    xq, xs = quantize_fp8_ref(x, input_scale, pre_scale=pre_scale)
    xd = xq.float() * (xs[:, None] if xs.numel() > 1 else xs.reshape(()))
    y = xd @ dequantize_int4(qweight, scales, group_size, torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w4a8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
              input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              pre_scale: torch.Tensor | None = None, *, config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton W4A8 -> [M, N] in x's dtype: FP8 activation quantization, then int4 x fp8 on FP8 tensor cores."""
    _check_w4a8(x, qweight, scales, group_size, input_scale, bias, pre_scale, "w4a8_gemm")
    check_launch_device("w4a8_gemm", _w4a8_kernel, x, qweight, scales, input_scale, bias, pre_scale)
    m, k = x.shape
    n = qweight.shape[0]
    cfg = tuning.gemm_config("w4a8", m, n, k, config)
    # A K tile must stay inside one group (the group scale multiplies the tile's partial product) and be
    # at least 32 wide, the K of one FP8 tensor-core instruction.
    block_k = min(cfg.block_k, group_size & -group_size)
    xq, xs = quantize_fp8(x, input_scale, pre_scale=pre_scale)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    y = new_output(m, n, x.dtype, x.device, cfg)
    _w4a8_kernel[launch_grid(m, n, cfg)](
        xq, xs.reshape(-1), qweight, scales, x if bias is None else bias.to(x.dtype).contiguous(), y,
        m, n, k, xq.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
        GROUP_SIZE=group_size, PER_TOKEN=input_scale is None, HAS_BIAS=bias is not None,
        EVEN_K=k % (block_k * cfg.split_k) == 0, **tile_kwargs(cfg, block_k),
    )
    return finish_output(y, x.dtype)


def w4a8_tuning_case(m: int, n: int, k: int, device: str = "cuda", group_size: int = 128,
                     dtype: torch.dtype = torch.bfloat16):
    """Random inputs for `tuning.autotune`: (run(config) -> output, check(output) -> bool)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    qweight = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size, device=device) * 0.02 + 0.001).to(dtype)
    input_scale = (x.float().abs().amax() / FP8_MAX).reshape(())
    expected = w4a8_gemm_ref(x, qweight, scales, group_size, input_scale).float()
    tol = 2e-2 * expected.abs().max().item() + 1e-2

    return tuning_case(lambda cfg: w4a8_gemm(x, qweight, scales, group_size, input_scale, config=cfg), expected, tol)


@jit
def _w4a8_kernel(
    xq_ptr, xs_ptr, qw_ptr, scales_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # out^T tiles = W @ xq^T (see w4a16_gemm): the converted weight is the register operand, and
    # xq [M, K] row-major is the K-major shared-memory operand FP8 wgmma requires. The nibbles are put
    # back in K order (unlike w4a16's two half-depth dots): with 32-input groups a half tile would be
    # 16 deep, below FP8 wgmma's K of 32.
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k0 = (pid_k * iters + it) * BLOCK_K
        xq = load_rows(xq_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], m_ok, k0 + offs_k, K, EVEN_K)
        packed = load_rows(qw_ptr + offs_n[:, None] * stride_qn + (k0 // 2 + offs_kb)[None, :], n_ok,
                           k0 // 2 + offs_kb, K // 2, EVEN_K)
        w = _int4_to_e4m3(tl.interleave(packed & 0xF, packed >> 4))
        s = tl.load(scales_ptr + offs_n * stride_sn + tl.minimum(k0, K - 1) // GROUP_SIZE, mask=n_ok, other=0.0)
        acc += tl.dot(w, tl.trans(xq)) * s.to(tl.float32)[:, None]

    if PER_TOKEN:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    else:
        acc = acc * tl.load(xs_ptr)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, True, HAS_BIAS, SPLIT_K)


@jit
def _int4_to_e4m3(nibbles):
    """uint8 nibbles -> nibble - 8 as float8 e4m3 (via the fp16 magic exponent; exact for -8..7)."""
    return ((nibbles.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - 1032.0).to(tl.float8e4nv)

"""INT8 GEMMs: SmoothQuant W8A8 (int8 x int8 tensor cores) and weight-only W8A16.

Storage format (int8_sq and int8_wo checkpoints):
- `wq` int8 [N, K], symmetric; `w_scale` float32 [N] per output channel: w[n, k] = wq[n, k] * w_scale[n].
- W8A8 activations are int8 [M, K] with a float32 scale: per token ([M], dynamic, absmax / 127, made by
  `quantize_act.quantize_int8`) or per tensor (a scalar from calibration, static):
  x[m, k] = xq[m, k] * x_scale[m] (or * x_scale).

`int8_gemm(xq, x_scale, wq, w_scale, out_dtype, bias=None)`: int32 accumulation, then the float epilogue
y = float(acc) * x_scale[m] * w_scale[n] (+ bias) in `out_dtype`.
`int8_linear(x, wq, w_scale, input_scale=None, bias=None)`: quantize x (per token when input_scale is
None) then int8_gemm; two launches, since a per-token scale needs the whole row before the first product.
`int8_wo_gemm(x, wq, w_scale, bias=None)`: W8A16, the weight dequantised in the kernel.
Each has a pure-torch `*_ref` (CPU path). torch._int_mm reaches only 126 TOP/s on an H100, hence these.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.kernels._gemm_common import (finish_output, launch_grid, load_rows, new_output, output_tile, store_tile,
                                      tile_kwargs, tuning_case, weight_dot)
from llmx.kernels._triton_util import check_launch_device, jit, tl
from llmx.kernels.quantize_act import quantize_int8, quantize_int8_ref
from llmx.kernels.tuning import TileConfig

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_int8_weight_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: w [N, K] -> (wq int8 [N, K], w_scale float32 [N] = absmax / 127)."""
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    wq = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return wq, scale


def _check_weight(wq, w_scale, k, bias, what):
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != k:
        raise LlmxError(f"{what}: weight must be int8 [N, K] with K={k}, got {wq.dtype} {tuple(wq.shape)}.")
    n = wq.shape[0]
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise LlmxError(f"{what}: weight_scale must be float32 [N] = [{n}] (per output channel), "
                        f"got {w_scale.dtype} {tuple(w_scale.shape)}.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise LlmxError(f"{what}: bias must have shape [N] = [{n}], got {tuple(bias.shape)}.")


def _check_w8a8(xq, x_scale, wq, w_scale, out_dtype, bias, what):
    if xq.dtype != torch.int8 or xq.dim() != 2:
        raise LlmxError(f"{what}: xq must be int8 [M, K], got {xq.dtype} {tuple(xq.shape)}.")
    m, k = xq.shape
    if x_scale.dtype != torch.float32 or (x_scale.numel() != 1 and tuple(x_scale.shape) != (m,)):
        raise LlmxError(f"{what}: x_scale must be float32, a scalar (per tensor) or [M] = [{m}] (per token), "
                        f"got {x_scale.dtype} {tuple(x_scale.shape)}.")
    if out_dtype not in _OUT_DTYPES:
        raise LlmxError(f"{what}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}.")
    _check_weight(wq, w_scale, k, bias, what)


def int8_gemm_ref(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch W8A8: exact integer products (float64 holds every int32 sum exactly), then the same
    float32 epilogue as the kernel."""
    _check_w8a8(xq, x_scale, wq, w_scale, out_dtype, bias, "int8_gemm_ref")
    acc = (xq.to(torch.float64) @ wq.to(torch.float64).t()).to(torch.float32)
    xs = x_scale.reshape(-1, 1) if x_scale.numel() > 1 else x_scale.reshape(1, 1)
    y = acc * xs * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None, *,
              config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton W8A8 GEMM on int8 tensor cores -> [M, N] in out_dtype."""
    _check_w8a8(xq, x_scale, wq, w_scale, out_dtype, bias, "int8_gemm")
    check_launch_device("int8_gemm", _int8_gemm_kernel, xq, x_scale, wq, w_scale, bias)
    m, k = xq.shape
    n = wq.shape[0]
    cfg = tuning.gemm_config("int8", m, n, k, config)
    xq = xq if xq.stride(1) == 1 else xq.contiguous()
    wq = wq.contiguous()
    y = new_output(m, n, out_dtype, xq.device, cfg)
    _int8_gemm_kernel[launch_grid(m, n, cfg)](
        xq, wq, x_scale.reshape(-1).contiguous(), w_scale.contiguous(), xq if bias is None else bias.contiguous(), y,
        m, n, k, xq.stride(0), wq.stride(0), y.stride(0),
        PER_TOKEN=x_scale.numel() > 1, HAS_BIAS=bias is not None,
        EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, **tile_kwargs(cfg),
    )
    return finish_output(y, out_dtype)


def int8_linear_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch SmoothQuant linear: quantize x (per token, or with the static input_scale) then W8A8."""
    xq, xs = quantize_int8_ref(x, input_scale, pre_scale=pre_scale)
    return int8_gemm_ref(xq, xs, wq, w_scale, x.dtype, bias)


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                pre_scale: torch.Tensor | None = None, *, config: TileConfig | dict | None = None) -> torch.Tensor:
    """SmoothQuant linear x [M, K] -> [M, N] in x's dtype: Triton quantize (pre_scale = SmoothQuant's
    per-channel smoothing divisor folded as a multiplier, when not folded into the previous norm) + int8_gemm."""
    xq, xs = quantize_int8(x, input_scale, pre_scale=pre_scale)
    return int8_gemm(xq, xs, wq, w_scale, x.dtype, bias, config=config)


def _check_wo(x, wq, w_scale, bias, what):
    if x.dim() != 2 or x.dtype not in _OUT_DTYPES:
        raise LlmxError(f"{what}: x must be a 2-D float16/bfloat16/float32 tensor [M, K], "
                        f"got {x.dtype} {tuple(x.shape)}.")
    _check_weight(wq, w_scale, x.shape[1], bias, what)


def int8_wo_gemm_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch W8A16: dequantise in float32, cast to x's dtype, x @ w^T (+ bias)."""
    _check_wo(x, wq, w_scale, bias, "int8_wo_gemm_ref")
    w = (wq.to(torch.float32) * w_scale[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def int8_wo_gemm(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 config: TileConfig | dict | None = None) -> torch.Tensor:
    """Triton W8A16 GEMM: x [M, K] @ (wq * w_scale)^T (+ bias) -> [M, N] in x's dtype."""
    _check_wo(x, wq, w_scale, bias, "int8_wo_gemm")
    check_launch_device("int8_wo_gemm", _int8_wo_kernel, x, wq, w_scale, bias)
    m, k = x.shape
    n = wq.shape[0]
    cfg = tuning.gemm_config("int8_wo", m, n, k, config)
    x = x if x.stride(1) == 1 else x.contiguous()
    wq = wq.contiguous()
    y = new_output(m, n, x.dtype, x.device, cfg)
    _int8_wo_kernel[launch_grid(m, n, cfg)](
        x, wq, w_scale.contiguous(), x if bias is None else bias.to(x.dtype).contiguous(), y,
        m, n, k, x.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % (cfg.block_k * cfg.split_k) == 0, **tile_kwargs(cfg),
    )
    return finish_output(y, x.dtype)


def int8_tuning_case(m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Random W8A8 inputs for `tuning.autotune`: (run(config) -> output, check(output) -> bool)."""
    xq = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    xs = torch.rand(m, device=device) * 0.01 + 1e-3
    ws = torch.rand(n, device=device) * 0.01 + 1e-3
    expected = int8_gemm_ref(xq, xs, wq, ws, dtype).float()
    tol = 1e-2 * expected.abs().max().item() + 1e-3

    return tuning_case(lambda cfg: int8_gemm(xq, xs, wq, ws, dtype, config=cfg), expected, tol)


def int8_wo_tuning_case(m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """Random W8A16 inputs for `tuning.autotune`: (run(config) -> output, check(output) -> bool)."""
    x = torch.randn(m, k, device=device, dtype=dtype)
    wq = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    ws = torch.rand(n, device=device) * 0.001 + 1e-4
    expected = int8_wo_gemm_ref(x, wq, ws).float()
    tol = 2e-2 * expected.abs().max().item() + 1e-3

    return tuning_case(lambda cfg: int8_wo_gemm(x, wq, ws, config=cfg), expected, tol)


@jit
def _int8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_bn, stride_om,
    PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)

    # Both operands are K-major ([M, K] and [N, K] row-major), the layout int8 wgmma requires.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k = (pid_k * iters + it) * BLOCK_K + offs_k
        a = load_rows(a_ptr + offs_m[:, None] * stride_am + k[None, :], m_ok, k, K, EVEN_K)
        b = load_rows(b_ptr + offs_n[:, None] * stride_bn + k[None, :], n_ok, k, K, EVEN_K)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)

    y = acc.to(tl.float32)
    if PER_TOKEN:
        y = y * tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    else:
        y = y * tl.load(a_scale_ptr)
    y = y * tl.load(b_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    store_tile(y, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, False, HAS_BIAS, SPLIT_K)


@jit
def _int8_wo_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # out^T tiles = W @ x^T: the converted weight is the register operand, the batch the narrow side
    # (see w4a16_gemm). The per-channel scale is applied once to the accumulator.
    act = x_ptr.dtype.element_ty
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok = output_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
    for it in range(0, iters):
        k = (pid_k * iters + it) * BLOCK_K + offs_k
        x = load_rows(x_ptr + offs_m[:, None] * stride_xm + k[None, :], m_ok, k, K, EVEN_K)
        w = load_rows(w_ptr + offs_n[:, None] * stride_wn + k[None, :], n_ok, k, K, EVEN_K)
        acc = weight_dot(w.to(act), x, acc, act)  # int8 values are exact in fp16, bf16 and fp32

    acc = acc * tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, stride_om, True, HAS_BIAS, SPLIT_K)

"""Activation quantization for the W8A8 and FP8 GEMMs: x [M, K] -> (xq [M, K], scale), int8 or float8_e4m3fn.

- per token (dynamic; `scale=None`): scale[m] = max|x[m, :]| / QMAX, float32 [M] (QMAX 127 for int8,
  448 for fp8), floored at MIN_SCALE so an all-zero row gives zeros instead of NaN;
- per tensor (static): `scale` is the calibrated float32 scalar; values beyond the range saturate.
xq = round_to_nearest_even(x / scale), clamped to [-128, 127] (int8) or [-448, 448] (e4m3, rounded
to the nearest e4m3 value, ties to even). `pre_scale` [K] (SmoothQuant's smoothing, when it is not
folded into the previous norm) multiplies x in its own dtype first.

`quantize_int8` / `quantize_fp8` launch one Triton program per row (two passes over the row when the
scale is dynamic, the second from L2); `*_ref` are the pure-torch versions with the same results.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import check_launch_device, jit, tl, triton

INT8_MAX = 127.0
FP8_MAX = 448.0
MIN_SCALE = 1e-12
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x, scale, pre_scale, what):
    if x.dim() != 2 or x.dtype not in _ACT_DTYPES:
        raise LlmxError(f"{what}: x must be a 2-D float16/bfloat16/float32 tensor [M, K], "
                        f"got {x.dtype} {tuple(x.shape)}.")
    if scale is not None and (scale.numel() != 1 or scale.dtype != torch.float32):
        raise LlmxError(f"{what}: a static input_scale must be a float32 scalar tensor, "
                        f"got {scale.dtype} with {scale.numel()} elements.")
    if pre_scale is not None and tuple(pre_scale.shape) != (x.shape[1],):
        raise LlmxError(f"{what}: pre_scale must have shape [K] = [{x.shape[1]}], got {tuple(pre_scale.shape)}.")


def _scaled_ref(x, scale, pre_scale, qmax):
    """x (times pre_scale) in float32 divided by its per-token or static scale; returns (y, scale)."""
    if pre_scale is not None:
        x = x * pre_scale.to(x.dtype)
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=1) / qmax).clamp_min(MIN_SCALE)
        return xf / scale[:, None], scale
    return xf / scale.reshape(()), scale


def quantize_int8_ref(x: torch.Tensor, scale: torch.Tensor | None = None, *,
                      pre_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch: (xq int8 [M, K], scale float32 [M] per token, or the given static scale)."""
    _check(x, scale, pre_scale, "quantize_int8_ref")
    y, scale = _scaled_ref(x, scale, pre_scale, INT8_MAX)
    return torch.round(y).clamp(-128, 127).to(torch.int8), scale


def quantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor | None = None, *,
                     pre_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch: (xq float8_e4m3fn [M, K], scale float32 [M] per token, or the given static scale)."""
    _check(x, scale, pre_scale, "quantize_fp8_ref")
    y, scale = _scaled_ref(x, scale, pre_scale, FP8_MAX)
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _launch(x, scale, pre_scale, to_fp8, what):
    _check(x, scale, pre_scale, what)
    check_launch_device(what, _quantize_rows_kernel, x, scale, pre_scale)
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn if to_fp8 else torch.int8)
    per_token = scale is None
    scale_out = torch.empty(m, device=x.device, dtype=torch.float32) if per_token else scale
    block_k = min(triton.next_power_of_2(k), 4096)
    _quantize_rows_kernel[(m,)](
        x, x if pre_scale is None else pre_scale.to(x.dtype).contiguous(), scale_out.reshape(-1), out,
        k, x.stride(0), out.stride(0),
        PER_TOKEN=per_token, HAS_PRE_SCALE=pre_scale is not None, TO_FP8=to_fp8,
        BLOCK_K=block_k, num_warps=8 if block_k >= 2048 else 4,
    )
    return out, scale_out


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | None = None, *,
                  pre_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (xq int8 [M, K], scale float32 [M] per token when `scale` is None, else `scale`)."""
    return _launch(x, scale, pre_scale, False, "quantize_int8")


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None, *,
                 pre_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: (xq float8_e4m3fn [M, K], scale float32 [M] per token when `scale` is None, else `scale`)."""
    return _launch(x, scale, pre_scale, True, "quantize_fp8")


@jit
def _round_half_even(y):
    """Round float32 to the nearest integer, ties to even (torch.round's rule); exact for |y| < 2^22."""
    r = tl.floor(y + 0.5)
    tie_to_odd = ((r - y) == 0.5) & ((r.to(tl.int32) & 1) != 0)
    return tl.where(tie_to_odd, r - 1.0, r)


@jit
def _round_to_e4m3_grid(y):
    """Round float32 |y| <= 448 to the nearest float8_e4m3fn value (ties to even), in float32.

    Done by hand so the final cast is exact everywhere (the Triton interpreter's fp8 cast does not
    round correctly). The spacing of e4m3 values near |y| is 2^(e - 3) with e = floor(log2|y|),
    read from the fp32 exponent bits; below 2^-6 (subnormals) it stays 2^-9.
    """
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
    q = _round_half_even(a * inv_step) * step
    return tl.where(y < 0, -q, q)


@jit
def _quantize_rows_kernel(
    x_ptr, pre_ptr, scale_ptr, out_ptr, K, stride_xm, stride_om,
    PER_TOKEN: tl.constexpr, HAS_PRE_SCALE: tl.constexpr, TO_FP8: tl.constexpr, BLOCK_K: tl.constexpr,
):
    act = x_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if TO_FP8:
        qmax = 448.0
    else:
        qmax = 127.0
    if PER_TOKEN:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0)
            if HAS_PRE_SCALE:
                x = (x * tl.load(pre_ptr + k0 + offs, mask=k0 + offs < K, other=0.0)).to(act)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), qmax), 1e-12)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + offs < K
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k_ok, other=0.0)
        if HAS_PRE_SCALE:
            x = (x * tl.load(pre_ptr + k0 + offs, mask=k_ok, other=0.0)).to(act)
        y = tl.math.div_rn(x.to(tl.float32), scale)
        if TO_FP8:
            q = _round_to_e4m3_grid(tl.minimum(tl.maximum(y, -448.0), 448.0)).to(tl.float8e4nv)
        else:
            q = _round_half_even(tl.minimum(tl.maximum(y, -128.0), 127.0)).to(tl.int8)
        tl.store(out_ptr + row * stride_om + k0 + offs, q, mask=k_ok)

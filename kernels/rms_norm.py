"""RMSNorm, with an optional fused residual add, and the per-head variant Qwen3 applies to q and k.

Numerics follow Hugging Face's LlamaRMSNorm / Qwen3RMSNorm so bf16 outputs match transformers:
the residual add rounds to the activation dtype (HF adds in the model dtype), the variance and the
normalisation run in float32, the normalised row is rounded to the activation dtype and then multiplied
by the weight (cast to the activation dtype) with one final rounding.

All functions are out of place: they return new contiguous tensors and leave their inputs untouched.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import FLOAT_DTYPES, check_launch_device, jit, next_power_of_2, tl
from llmx.kernels.pdl import pdl_launch, wait_and_release

# Largest row a single program normalises in registers (Llama-3-405B's hidden size is 16384).
_MAX_ROW = 65536


@jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, new_residual_ptr,
    n_rows, rows_per_outer,
    stride_x_outer, stride_x_inner, stride_r_outer, stride_r_inner,
    eps,
    N_COLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr, GEMMA: tl.constexpr = False,
):
    # Row r of the logical [n_rows, N_COLS] matrix sits at (r // rows_per_outer) * stride_outer +
    # (r % rows_per_outer) * stride_inner: a plain [T, H] matrix has rows_per_outer = 1, a per-head norm
    # over x [T, heads, head_dim] has rows_per_outer = heads, so strided q/k views need no copy.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < N_COLS)[None, :]
    outer = (rows // rows_per_outer).to(tl.int64)
    inner = (rows % rows_per_outer).to(tl.int64)
    x_offsets = (outer * stride_x_outer + inner * stride_x_inner)[:, None] + cols[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * N_COLS + cols[None, :]
    out_dtype = y_ptr.dtype.element_ty

    wait_and_release(PDL)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r_offsets = (outer * stride_r_outer + inner * stride_r_inner)[:, None] + cols[None, :]
        summed = (x + tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(tl.float32)).to(out_dtype)
        tl.store(new_residual_ptr + out_offsets, summed, mask=mask)
        x = summed.to(tl.float32)

    mean_square = tl.sum(x * x, axis=1) / N_COLS
    inv_rms = tl.math.rsqrt(mean_square + eps)
    if GEMMA:  # (1 + w) in float32 times the unrounded normalised row, one rounding (transformers' Gemma)
        weight = 1.0 + tl.load(weight_ptr + cols, mask=cols < N_COLS, other=0.0).to(tl.float32)
        tl.store(y_ptr + out_offsets, (x * inv_rms[:, None] * weight[None, :]).to(out_dtype), mask=mask)
    else:
        normed = (x * inv_rms[:, None]).to(out_dtype).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=cols < N_COLS, other=0.0).to(out_dtype).to(tl.float32)
        tl.store(y_ptr + out_offsets, (normed * weight[None, :]).to(out_dtype), mask=mask)


def _check(op: str, x: torch.Tensor, weight: torch.Tensor, expected_dim: int) -> None:
    layout = "[tokens, hidden]" if expected_dim == 2 else "[tokens, heads, head_dim]"
    if x.dim() != expected_dim:
        raise LlmxError(f"{op}: x must be {layout}, got shape {tuple(x.shape)}.")
    if x.dtype not in FLOAT_DTYPES:
        raise LlmxError(f"{op}: x must be float16/bfloat16/float32, got {x.dtype}.")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise LlmxError(f"{op}: weight must be [{x.shape[-1]}] (the normalised size), got {tuple(weight.shape)}.")
    if x.shape[-1] > _MAX_ROW:
        raise LlmxError(f"{op}: rows of {x.shape[-1]} elements exceed the kernel's {_MAX_ROW}.")


def _check_residual(op: str, x: torch.Tensor, residual: torch.Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise LlmxError(f"{op}: residual must match x ({x.dtype} {tuple(x.shape)}), got {residual.dtype} "
                        f"{tuple(residual.shape)}.")


def _normalise_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight.to(x.dtype) * normed


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch `rms_norm`: x [T, H], weight [H] -> y [T, H] in x's dtype."""
    _check("rms_norm", x, weight, 2)
    return _normalise_ref(x, weight, eps)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `fused_add_rms_norm`: returns (rmsnorm(x + residual) * weight, x + residual)."""
    _check("fused_add_rms_norm", x, weight, 2)
    _check_residual("fused_add_rms_norm", x, residual)
    summed = x + residual
    return _normalise_ref(summed, weight, eps), summed


def rms_norm_heads_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Pure-torch `rms_norm_heads`: x [T, heads, head_dim], weight [head_dim] -> normalised per head."""
    _check("rms_norm_heads", x, weight, 3)
    return _normalise_ref(x, weight, eps).contiguous()


def _launch(op: str, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, gemma: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise the last dim of a 2-D or 3-D x (any strides with a contiguous last dim)."""
    check_launch_device(op, _rms_norm_kernel, x, residual, weight)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    weight = weight.contiguous()
    n_cols = x.shape[-1]
    rows_per_outer = x.shape[1] if x.dim() == 3 else 1
    n_rows = x.numel() // n_cols
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(y) if residual is not None else None
    if n_rows == 0:
        return y, new_residual
    inner_stride = x.stride(1) if x.dim() == 3 else 0
    residual_strides = (0, 0)
    if residual is not None:
        residual_strides = (residual.stride(0), residual.stride(1) if residual.dim() == 3 else 0)
    block_c = next_power_of_2(n_cols)
    # Aim for ~4K elements per program: one row of a wide hidden state, or many short head rows.
    block_r = max(1, min(next_power_of_2(n_rows), 4096 // block_c))
    num_warps = min(16, max(1, block_r * block_c // 512))
    grid = (-(-n_rows // block_r),)
    _rms_norm_kernel[grid](
        x, residual if residual is not None else x, weight, y, new_residual if new_residual is not None else y,
        n_rows, rows_per_outer,
        x.stride(0), inner_stride, residual_strides[0], residual_strides[1],
        float(eps),
        N_COLS=n_cols, BLOCK_R=block_r, BLOCK_C=block_c, HAS_RESIDUAL=residual is not None, GEMMA=gemma,
        num_warps=num_warps, **pdl_launch(x.device),
    )
    return y, new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H], weight [H] -> rmsnorm(x) * weight [T, H] in x's dtype (Triton)."""
    _check("rms_norm", x, weight, 2)
    return _launch("rms_norm", x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual) * weight, x + residual), both [T, H] in x's dtype (Triton, one pass)."""
    _check("fused_add_rms_norm", x, weight, 2)
    _check_residual("fused_add_rms_norm", x, residual)
    y, summed = _launch("fused_add_rms_norm", x, residual, weight, eps)
    return y, summed


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's q/k norm: x [T, heads, head_dim] (strided views welcome), weight [head_dim] -> contiguous
    [T, heads, head_dim] normalised over head_dim (Triton)."""
    _check("rms_norm_heads", x, weight, 3)
    return _launch("rms_norm_heads", x, None, weight, eps)[0]


def gemma_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm, op for op as transformers computes it: normalise in float32, multiply by (1 + weight) in
    float32, round once to x's dtype (Llama rounds before multiplying by weight). x [T, H], weight [H] -> [T, H]."""
    _check("gemma_rms_norm", x, weight, 2)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).type_as(x)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm (Triton): x [T, H], weight [H] -> rmsnorm(x) * (1 + weight) [T, H] in x's dtype."""
    _check("gemma_rms_norm", x, weight, 2)
    return _launch("gemma_rms_norm", x, None, weight, eps, gemma=True)[0]

"""Scatter this step's keys and values into the paged KV cache, quantizing when the cache is fp8/int8.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]. Token t goes to slot
slot_mapping[t] = block * block_size + offset; a negative slot marks a padding token that is skipped.
A quantized cache stores round(x / scale) with one float32 scale per layer (fp8 e4m3: round to nearest
even, saturated at +-448; int8: round half to even, clamped to [-128, 127]).
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import (
    FLOAT_DTYPES,
    FP8_E4M3_MAX,
    QUANTIZED_KV_DTYPES,
    check_launch_device,
    check_scale,
    jit,
    next_power_of_2,
    tl,
)

# QUANT constexpr values of the kernel.
_NO_QUANT, _FP8, _INT8 = 0, 1, 2


@jit
def round_half_even(x):
    """Round-half-to-even of float32 `x` with plain floor arithmetic (exact for |x| < 2**23; works in the
    interpreter, which has no libdevice rint)."""
    whole = tl.floor(x)
    fraction = x - whole
    is_odd = whole - 2.0 * tl.floor(whole * 0.5)
    return tl.where(fraction > 0.5, whole + 1.0, tl.where(fraction < 0.5, whole, whole + is_odd))


@jit
def round_to_e4m3_grid(y):
    """Round float32 `y` in [-448, 448] to the nearest float8 e4m3 value (ties to even), staying in float32.

    Done by hand so that the final cast to fp8 is exact: the GPU's converter and Triton's CPU interpreter
    (whose fp8 rounding mishandles the carry into the exponent) then store identical bytes.
    """
    magnitude = tl.abs(y)
    biased_exponent = magnitude.to(tl.int32, bitcast=True) >> 23
    # e4m3 keeps 3 mantissa bits; below its smallest normal, 2**-6, the spacing stays 2**-9.
    ulp_exponent = tl.maximum(biased_exponent, 127 - 6) - 3
    ulp = (ulp_exponent << 23).to(tl.float32, bitcast=True)
    inverse_ulp = ((254 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
    rounded = round_half_even(magnitude * inverse_ulp) * ulp
    # Rounding the magnitude and restoring the sign bit keeps -0.0 (and negatives rounding to it) as torch does.
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -rounded, rounded)


@jit
def quantize_for_cache(x, scale, QUANT: tl.constexpr, out_dtype: tl.constexpr):
    """x (any float) -> the cache's element type; scale is the layer's float32 KV scale."""
    if QUANT == 1:
        y = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -448.0, 448.0)
        return round_to_e4m3_grid(y).to(tl.float8e4nv)
    elif QUANT == 2:
        y = round_half_even(tl.math.div_rn(x.to(tl.float32), scale))
        return tl.clamp(y, -128.0, 127.0).to(tl.int8)
    else:
        return x.to(out_dtype)


@jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr,
):
    # One program per token: its [num_kv_heads, head_dim] key and value tiles (a few KB) move together.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        k_scale = 1.0
        v_scale = 1.0
        if QUANT != 0:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)

        k = tl.load(k_ptr + token * stride_k_token + heads * stride_k_head + dims, mask=mask)
        k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot + heads * stride_kc_head + dims
        tl.store(k_dst, quantize_for_cache(k, k_scale, QUANT, k_cache_ptr.dtype.element_ty), mask=mask)

        v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
        v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot + heads * stride_vc_head + dims
        tl.store(v_dst, quantize_for_cache(v, v_scale, QUANT, v_cache_ptr.dtype.element_ty), mask=mask)


def check_kv_write_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    op = "write_kv_cache"
    if k.dim() != 3 or v.shape != k.shape:
        raise LlmxError(f"{op}: k and v must both be [tokens, kv_heads, head_dim], got {tuple(k.shape)} and "
                        f"{tuple(v.shape)}.")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise LlmxError(f"{op}: k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], "
                        f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    if tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise LlmxError(f"{op}: the cache holds [kv_heads, head_dim] = {tuple(k_cache.shape[2:])} per token but "
                        f"k has {tuple(k.shape[1:])}; size the cache from the model config.")
    if k.dtype not in FLOAT_DTYPES or v.dtype != k.dtype:
        raise LlmxError(f"{op}: k and v must share a float16/bfloat16/float32 dtype, got {k.dtype} and {v.dtype}.")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in FLOAT_DTYPES + QUANTIZED_KV_DTYPES:
        raise LlmxError(f"{op}: k_cache and v_cache must share a dtype among float16/bfloat16/float32/"
                        f"float8_e4m3fn/int8, got {k_cache.dtype} and {v_cache.dtype}.")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0] or slot_mapping.dtype != torch.int64:
        raise LlmxError(f"{op}: slot_mapping must be int64 [tokens={k.shape[0]}], got {slot_mapping.dtype} "
                        f"{tuple(slot_mapping.shape)}.")
    if k_cache.dtype in QUANTIZED_KV_DTYPES:
        check_scale(op, "k_scale", k_scale)
        check_scale(op, "v_scale", v_scale)


def quant_mode(cache_dtype: torch.dtype) -> int:
    """The kernels' QUANT constexpr for a cache element type."""
    return {torch.float8_e4m3fn: _FP8, torch.int8: _INT8}.get(cache_dtype, _NO_QUANT)


def _quantize_ref(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    if cache_dtype == torch.float8_e4m3fn:
        return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(cache_dtype)
    if cache_dtype == torch.int8:
        return torch.round(x.float() / scale.float()).clamp(-128, 127).to(cache_dtype)
    return x.to(cache_dtype)


def write_kv_cache_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> None:
    """Pure-torch reference (and CPU path) of `write_kv_cache`: same arguments, writes the caches in place.

    Scales are ignored for a float cache (a checkpoint may carry them while the engine keeps the model dtype).
    """
    check_kv_write_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = _quantize_ref(k[keep], k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = _quantize_ref(v[keep], v_cache.dtype, v_scale)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Write k, v [T, kv_heads, head_dim] into the caches at `slot_mapping` [T] (int64, negative = skip).

    In place; one Triton program per token. k/v may be strided views (e.g. slices of a fused qkv output)
    as long as head_dim is contiguous.
    """
    check_kv_write_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    quantized = k_cache.dtype in QUANTIZED_KV_DTYPES
    check_launch_device("write_kv_cache", _write_kv_cache_kernel, k, v, k_cache, v_cache, slot_mapping,
                        k_scale if quantized else None, v_scale if quantized else None)
    tokens, num_kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise LlmxError("write_kv_cache: the caches must have a contiguous head_dim; allocate them with torch.empty.")
    quant = quant_mode(k_cache.dtype)
    # Unused pointers still need a tensor argument; the cache itself is a harmless stand-in.
    k_scale_arg = k_scale if quantized else k_cache
    v_scale_arg = v_scale if quantized else v_cache
    block_h = next_power_of_2(num_kv_heads)
    block_d = next_power_of_2(head_dim)
    _write_kv_cache_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale_arg, v_scale_arg,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=block_h, BLOCK_D=block_d, QUANT=quant,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )

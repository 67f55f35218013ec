"""Rotary position embedding in Hugging Face Llama's rotate-half (NeoX) layout, and its cos/sin table.

For a head vector x of size D, the pair of dimension i is (i, i + D/2):
    out[i]       = x[i] * cos(p * f_i) - x[i + D/2] * sin(p * f_i)
    out[i + D/2] = x[i + D/2] * cos(p * f_i) + x[i] * sin(p * f_i)
with f_i the (possibly scaled) inverse frequency of pair i and p the token's position.
The kernels take the cos/sin table as a plain tensor: [rows, D] float32 with cos in [:, :D/2] and sin in
[:, D/2:] (llmx.runtime.layers.rope_tables builds it from the model's RoPE settings).

`apply_rotary` computes in float32 and rounds once to the input dtype; it returns new contiguous
tensors and leaves q and k untouched, so they may be strided views of a fused qkv projection.
"""

from __future__ import annotations

import torch

from llmx.common.errors import LlmxError
from llmx.kernels._triton_util import FLOAT_DTYPES, QUANTIZED_KV_DTYPES, check_launch_device, jit, next_power_of_2, tl
from llmx.kernels.kv_cache_write import check_kv_write_inputs, quant_mode, quantize_for_cache, write_kv_cache_ref
from llmx.kernels.pdl import pdl_launch, wait_and_release


@jit
def _rotate_heads(src_ptr, dst_ptr, stride_src_head, stride_dst_head, cos, sin, scale,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  QUANT: tl.constexpr):
    """Rotate one token's [NUM_HEADS, 2*HALF] heads from src into dst (both with strided heads).

    The rotated values round to src's dtype first (what `apply_rotary` returns); a KV-cache destination
    then stores them as `write_kv_cache` would (QUANT 1 = fp8, 2 = int8 with the layer's `scale`).
    """
    heads = tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (pairs < HALF)
    src = src_ptr + heads * stride_src_head + pairs
    first = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    act_dtype = src_ptr.dtype.element_ty
    out_dtype = dst_ptr.dtype.element_ty
    dst = dst_ptr + heads * stride_dst_head + pairs
    tl.store(dst, quantize_for_cache((first * cos - second * sin).to(act_dtype), scale, QUANT, out_dtype), mask=mask)
    tl.store(dst + HALF, quantize_for_cache((second * cos + first * sin).to(act_dtype), scale, QUANT, out_dtype),
             mask=mask)


@jit
def _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache_pos, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The token's cos and sin rows, [1, BLOCK_HALF] float32 each."""
    position = tl.load(positions_ptr + token)
    pairs = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + position * stride_cache_pos + pairs
    cos = tl.load(row, mask=pairs < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF, mask=pairs < HALF, other=0.0)[None, :]
    return cos, sin


@jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, cos_sin_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_cache_pos,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per token: its cos/sin row is loaded once and applied to every q and k head.
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache_pos, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_q_token, q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF), stride_q_head,
                  2 * HALF, cos, sin, 1.0, NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF, 0)
    _rotate_heads(k_ptr + token * stride_k_token, k_out_ptr + token * (NUM_K_HEADS * 2 * HALF), stride_k_head,
                  2 * HALF, cos, sin, 1.0, NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF, 0)


@jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, positions_ptr, cos_sin_ptr,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_cache_pos, stride_c_block, stride_c_slot, stride_c_head,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: rotate its q heads into q_out, and its k heads straight into the token's
    # KV-cache slot next to its v heads; the rotated k never makes a round trip through memory.
    token = tl.program_id(0).to(tl.int64)
    wait_and_release(PDL)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache_pos, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_q_token, q_out_ptr + token * (NUM_Q_HEADS * 2 * HALF), stride_q_head,
                  2 * HALF, cos, sin, 1.0, NUM_Q_HEADS, HALF, BLOCK_HQ, BLOCK_HALF, 0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot >= 0:  # negative: a padding token with no cache slot
        k_scale = 1.0
        v_scale = 1.0
        if QUANT != 0:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        slot_offset = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
        _rotate_heads(k_ptr + token * stride_k_token, k_cache_ptr + slot_offset, stride_k_head, stride_c_head,
                      cos, sin, k_scale, NUM_K_HEADS, HALF, BLOCK_HK, BLOCK_HALF, QUANT)
        heads = tl.arange(0, BLOCK_HK)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < NUM_K_HEADS) & (dims < 2 * HALF)
        v = tl.load(v_ptr + token * stride_v_token + heads * stride_v_head + dims, mask=mask)
        tl.store(v_cache_ptr + slot_offset + heads * stride_c_head + dims,
                 quantize_for_cache(v, v_scale, QUANT, v_cache_ptr.dtype.element_ty), mask=mask)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    op = "apply_rotary"
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2:
        raise LlmxError(f"{op}: q and k must be [tokens, heads, head_dim] with equal tokens and even head_dim, got "
                        f"{tuple(q.shape)} and {tuple(k.shape)}.")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype:
        raise LlmxError(f"{op}: q and k must share a float16/bfloat16/float32 dtype, got {q.dtype} and {k.dtype}.")
    if (cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] > q.shape[2] or cos_sin_cache.shape[1] % 2
            or cos_sin_cache.dtype != torch.float32):
        raise LlmxError(f"{op}: cos_sin_cache must be float32 [max_pos, rotary_dim <= head_dim={q.shape[2]}], got "
                        f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}; build it with rope_cos_sin_cache.")
    if positions.dim() != 1 or positions.shape[0] != q.shape[0] or positions.dtype != torch.int64:
        raise LlmxError(f"{op}: positions must be int64 [tokens={q.shape[0]}], got {positions.dtype} "
                        f"{tuple(positions.shape)}.")


def apply_rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `apply_rotary`: q [T, Hq, D], k [T, Hkv, D] -> new rotated (q, k) in their dtype."""
    _check(q, k, positions, cos_sin_cache)
    if positions.numel() and int(positions.max()) >= cos_sin_cache.shape[0]:
        raise LlmxError(f"apply_rotary: position {int(positions.max())} is beyond the rotary table's "
                        f"{cos_sin_cache.shape[0]} positions; raise max_position_embeddings or shorten the prompt.")
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    table = cos_sin_cache[positions]
    cos, sin = table[:, None, :half], table[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        # Partial rotary (rotary_dim < head_dim, Phi-3): the dims past rotary_dim pass through unchanged.
        x32 = x.float()
        first, second = x32[..., :half], x32[..., half:rotary_dim]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(x.dtype)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1) if rotary_dim < x.shape[-1] else rotated

    return rotate(q), rotate(k)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `apply_rotary`: one launch rotates q [T, Hq, D] and k [T, Hkv, D] (strided views allowed,
    head_dim contiguous) and returns new contiguous tensors. Positions are trusted to be < max_pos."""
    _check(q, k, positions, cos_sin_cache)
    if cos_sin_cache.shape[1] != q.shape[2]:
        raise LlmxError("rotary: the Triton kernels rotate whole heads; partial rotary runs the torch reference.")
    check_launch_device("apply_rotary", _rotary_kernel, q, k, positions, cos_sin_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    tokens, num_q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    block_half = next_power_of_2(half)
    block_hq = next_power_of_2(num_q_heads)
    _rotary_kernel[(tokens,)](
        q, k, q_out, k_out, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(k.shape[1]), BLOCK_HALF=block_half,
        num_warps=4 if block_hq * block_half >= 2048 else 2,
    )
    return q_out, k_out


def rotary_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch `rotary_write_kv`: `apply_rotary_ref`, then `write_kv_cache_ref` of the rotated k and v."""
    q_rotated, k_rotated = apply_rotary_ref(q, k, positions, cos_sin_cache)
    write_kv_cache_ref(k_rotated, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return q_rotated


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton, one launch: rotate q [T, Hq, D] (returned, contiguous) and k [T, Hkv, D], and store the
    rotated k and v [T, Hkv, D] into the paged caches at `slot_mapping` (quantized for an fp8/int8 cache).

    Same results as `apply_rotary` followed by `write_kv_cache`, minus one kernel and the rotated k's trip
    through memory. q/k/v may be strided views of the fused qkv output (head_dim contiguous).
    """
    _check(q, k, positions, cos_sin_cache)
    if cos_sin_cache.shape[1] != q.shape[2]:
        raise LlmxError("rotary: the Triton kernels rotate whole heads; partial rotary runs the torch reference.")
    check_kv_write_inputs(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    quantized = k_cache.dtype in QUANTIZED_KV_DTYPES
    check_launch_device("rotary_write_kv", _rotary_write_kv_kernel, q, k, v, positions, cos_sin_cache, k_cache,
                        v_cache, slot_mapping, k_scale if quantized else None, v_scale if quantized else None)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise LlmxError("rotary_write_kv: k_cache and v_cache need equal strides and a contiguous head_dim; "
                        "allocate them with torch.empty.")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    tokens, num_q_heads, head_dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    half = head_dim // 2
    block_hq = next_power_of_2(num_q_heads)
    _rotary_write_kv_kernel[(tokens,)](
        q, k, v, q_out, positions, cos_sin_cache.contiguous(), k_cache, v_cache, slot_mapping,
        k_scale if quantized else k_cache, v_scale if quantized else v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HQ=block_hq, BLOCK_HK=next_power_of_2(k.shape[1]), BLOCK_HALF=next_power_of_2(half),
        BLOCK_D=next_power_of_2(head_dim), QUANT=quant_mode(k_cache.dtype),
        num_warps=4 if block_hq * half >= 2048 else 2, **pdl_launch(q.device),
    )
    return q_out

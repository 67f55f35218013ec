"""Dispatch of the hot-path operations: Triton kernels on CUDA, pure-torch references elsewhere.

Each kernel module in llmx.kernels exposes a launching wrapper and a `*_ref` with the same signature;
this is the single place that chooses between them, so model code never branches on the device. The quantized
Linears' QuantMethods (llmx.formats.weights) choose through `kernel_or_reference` too.
`set_use_triton(False)` forces the references on GPU too (for A/B checks and debugging).
`set_fused_mlp(False)` (or LLMX_FUSED_MLP=0, read at the first use) keeps the MLP's activation out of its gate_up
GEMV (decoder.MLP).
"""

from __future__ import annotations

import functools

import torch

from llmx.common import env

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

_USE_TRITON = True
_FUSED_MLP: bool | None = None  # set_fused_mlp's choice; None until the first use reads LLMX_FUSED_MLP


def set_use_triton(enabled: bool) -> None:
    global _USE_TRITON
    _USE_TRITON = enabled


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    from llmx.kernels._triton_util import triton_available

    return triton_available() and torch.cuda.is_available()


def use_kernels(t: torch.Tensor) -> bool:
    return _USE_TRITON and t.is_cuda and _triton_available()


def kernel_or_reference(t: torch.Tensor, kernel, reference):
    """`kernel` (a Triton launching wrapper) where `t` is on a GPU the kernels run on, else `reference` (its
    pure-torch twin, or None where the operation has no path off the GPU)."""
    return kernel if use_kernels(t) else reference


def set_fused_mlp(enabled: bool) -> None:
    global _FUSED_MLP
    _FUSED_MLP = enabled


def fused_mlp_enabled() -> bool:
    global _FUSED_MLP
    if _FUSED_MLP is None:
        _FUSED_MLP = env.LLMX_FUSED_MLP.read()
    return _FUSED_MLP


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from llmx.kernels import rms_norm as k

    return k.rms_norm(x, weight, eps) if use_kernels(x) else k.rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rmsnorm(x + residual) * weight, x + residual)."""
    from llmx.kernels import rms_norm as k

    fn = k.fused_add_rms_norm if use_kernels(x) else k.fused_add_rms_norm_ref
    return fn(x, residual, weight, eps)


def rotary_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """Rotate q and k, store the rotated k and v into the paged KV cache; returns the rotated q."""
    from llmx.kernels import rotary as r

    # Partial rotary (a table narrower than the head) runs the torch reference on GPU too.
    whole_heads = cos_sin_cache.shape[1] == q.shape[2]
    fn = r.rotary_write_kv if use_kernels(q) and whole_heads else r.rotary_write_kv_ref
    return fn(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]."""
    from llmx.kernels import activation as a

    return a.silu_and_mul(x) if use_kernels(x) else a.silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] -> gelu_tanh(gate) * up [T, I] (Gemma)."""
    from llmx.kernels import activation as a

    return a.gelu_tanh_and_mul(x) if use_kernels(x) else a.gelu_tanh_and_mul_ref(x)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normed(x) * (1 + weight), in float32."""
    from llmx.kernels import rms_norm as k

    return k.gemma_rms_norm(x, weight, eps) if use_kernels(x) else k.gemma_rms_norm_ref(x, weight, eps)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    k_scale=None, v_scale=None, sliding_window=None, max_query_len=None, softcap=None,
                    num_leading_decodes=0):
    from llmx.kernels import paged_attention as a

    kwargs = dict(k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window, max_query_len=max_query_len,
                  softcap=softcap)
    if use_kernels(q):
        return a.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                 num_leading_decodes=num_leading_decodes, **kwargs)
    return a.paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, **kwargs)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts MLP: x [T, H], stacked experts w13 [E, 2I, H] and w2 [E, H, I], routing weights and
    expert ids [T, k] -> sum over each token's experts of weight * down(silu(gate) * up) [T, H]."""
    from llmx.kernels import fused_moe as m

    fn = m.fused_moe if use_kernels(x) else m.fused_moe_ref
    return fn(x, w13, w2, weights, ids)


def fused_moe_fp8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, a13_scale: torch.Tensor,
                  w2: torch.Tensor, w2_scale: torch.Tensor, a2_scale: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """fused_moe with fp8 experts: e4m3 weights with a scale per expert, one static input scale per projection."""
    from llmx.kernels import fused_moe as m

    fn = m.fused_moe_fp8 if use_kernels(x) else m.fused_moe_fp8_ref
    return fn(x, w13, w13_scale, a13_scale, w2, w2_scale, a2_scale, weights, ids)

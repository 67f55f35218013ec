"""RMSNorm (plain, fused residual add, per-head) and rotary embedding: references against transformers'
own modules, Triton kernels (through Triton's CPU interpreter) against the references.

As in test_kernels_attention.py, the kernel tests (test_interpreted_*) run in a child pytest process
started with TRITON_INTERPRET=1, because Triton fixes interpret-or-compile when it is imported; bf16 is
covered by the CUDA tests at the end, skipped on CPU-only machines.
"""

from __future__ import annotations


import math

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.kernels import rms_norm as norm, rotary
from helpers.triton_interpreter import interpreted, needs_cuda, run_interpreted_tests, runs_children
from llmx.formats.config import RopeScaling
from llmx.runtime.layers import rope_tables

@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        return module(x)


def _rand(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_reference_equals_transformers(dtype):
    x, weight = _rand(7, 96, dtype=dtype), _rand(96, dtype=dtype, seed=1)
    assert torch.equal(norm.rms_norm_ref(x, weight, 1e-5), _hf_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_reference_equals_add_then_transformers(dtype):
    x, residual, weight = _rand(5, 64, dtype=dtype), _rand(5, 64, dtype=dtype, seed=1), _rand(64, dtype=dtype, seed=2)
    y, summed = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(summed, x + residual)  # the add rounds to the model dtype, as in HF's decoder layer
    assert torch.equal(y, _hf_rms_norm(x + residual, weight, 1e-6))


def test_rms_norm_heads_reference_normalises_each_head():
    x, weight = _rand(4, 3, 32, dtype=torch.bfloat16), _rand(32, dtype=torch.bfloat16, seed=1)
    expected = _hf_rms_norm(x.reshape(-1, 32), weight, 1e-6).view(4, 3, 32)
    assert torch.equal(norm.rms_norm_heads_ref(x, weight, 1e-6), expected)


def _qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, seed=0):
    """q and k as strided [T, heads, head_dim] views of one fused qkv projection output."""
    fused = _rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = fused[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return q, k


NORM_SHAPES = [(1, 64), (7, 96), (33, 128), (300, 64)]  # hidden 96: not a power of two; 300 rows: many programs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
@interpreted
def test_interpreted_rms_norm_kernels_match_reference(rows, hidden, dtype):
    x, residual, weight = _rand(rows, hidden, dtype=dtype), _rand(rows, hidden, dtype=dtype, seed=1), \
        _rand(hidden, dtype=dtype, seed=2)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-6), norm.rms_norm_ref(x, weight, 1e-6), **tol)
    y, summed = norm.fused_add_rms_norm(x, residual, weight, 1e-6)
    y_ref, summed_ref = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    assert torch.equal(summed, summed_ref)
    torch.testing.assert_close(y, y_ref, **tol)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemma_rms_norm_reference_equals_transformers(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    x, weight = _rand(7, 96, dtype=dtype), _rand(96, dtype=torch.float32, seed=1) * 0.1
    hf = Gemma3RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(weight)
        expected = hf.to(dtype)(x)
    assert torch.equal(norm.gemma_rms_norm_ref(x, weight.to(dtype), 1e-6), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden", NORM_SHAPES)
@interpreted
def test_interpreted_gemma_rms_norm_kernel_matches_reference(rows, hidden, dtype):
    x, weight = _rand(rows, hidden, dtype=dtype), _rand(hidden, dtype=dtype, seed=2) * 0.1
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    out = norm.gemma_rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, norm.gemma_rms_norm_ref(x, weight, 1e-6), **tol)
    assert not torch.allclose(out, norm.rms_norm_ref(x, weight, 1e-6), atol=1e-2)  # (1 + w), not w


@pytest.mark.parametrize("heads,head_dim", [(4, 32), (5, 48), (40, 64)])
@interpreted
def test_interpreted_rms_norm_heads_kernel_on_strided_views(heads, head_dim):
    q, k = _qkv_views(9, heads, 2, head_dim, torch.float32)
    weight = _rand(head_dim, seed=3)
    for x in (q, k):
        out = norm.rms_norm_heads(x, weight, 1e-6)
        assert out.is_contiguous()
        torch.testing.assert_close(out, norm.rms_norm_heads_ref(x, weight, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_mismatched_inputs():
    x = _rand(3, 64)
    with pytest.raises(LlmxError, match="weight must be"):
        norm.rms_norm_ref(x, _rand(32), 1e-6)
    with pytest.raises(LlmxError, match="residual must match"):
        norm.fused_add_rms_norm_ref(x, _rand(3, 64, dtype=torch.float16), _rand(64), 1e-6)
    with pytest.raises(LlmxError, match="tokens, heads, head_dim"):
        norm.rms_norm_heads_ref(x, _rand(64), 1e-6)


# ----------------------------------------------------------------------------------------------------
# Rotary embedding
# ----------------------------------------------------------------------------------------------------


def _hf_cos_sin(head_dim: int, positions: torch.Tensor, theta: float, rope_parameters: dict):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=4096, rope_parameters={"rope_theta": theta, **rope_parameters})
    module = LlamaRotaryEmbedding(config)
    cos, sin = module(torch.zeros(1, dtype=torch.float32), positions[None])
    return cos[0], sin[0], module.inv_freq


ROPE_SCALINGS = {
    "default": (None, {"rope_type": "default"}),
    "linear": (RopeScaling(type="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0}),
    # original context 256 with theta 5e5 and head_dim 32 puts pairs in all three llama3 bands.
    "llama3": (RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=256),
               {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256}),
    # transformers derives YaRN's attention factor 0.1 * ln(factor) + 1 (convert stores it resolved).
    "yarn": (RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=256,
                         attention_factor=0.1 * math.log(4.0) + 1.0),
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    # Within the original context LongRoPE uses its short factors; its attention factor comes from factor.
    "longrope": (RopeScaling(type="longrope", factor=4.0, original_max_position_embeddings=256,
                             attention_factor=math.sqrt(1 + math.log(4.0) / math.log(256)),
                             short_factor=tuple(1.0 + i / 8 for i in range(16)),
                             long_factor=tuple(2.0 + i for i in range(16))),
                 {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 256,
                  "short_factor": [1.0 + i / 8 for i in range(16)], "long_factor": [2.0 + i for i in range(16)]}),
}


@pytest.mark.parametrize("scaling,hf_parameters", ROPE_SCALINGS.values(), ids=ROPE_SCALINGS.keys())
def test_rope_cache_equals_transformers_rotary_embedding(scaling, hf_parameters):
    head_dim, theta, max_pos = 32, 500000.0, 3000
    positions = torch.arange(max_pos)
    cos, sin, hf_inv_freq = _hf_cos_sin(head_dim, positions, theta, hf_parameters)
    # transformers' forward sees max_pos positions: LongRoPE picks its long factors.
    assert torch.equal(rope_tables.rope_inverse_frequencies(head_dim, theta, scaling, seq_len=max_pos), hf_inv_freq)
    cache = rope_tables.rope_cos_sin_cache(head_dim, max_pos, theta, scaling, seq_len=max_pos)
    assert cache.shape == (max_pos, head_dim) and cache.dtype == torch.float32
    half = head_dim // 2
    assert torch.equal(cache[:, :half], cos[:, :half]) and torch.equal(cache[:, :half], cos[:, half:])
    assert torch.equal(cache[:, half:], sin[:, :half]) and torch.equal(cache[:, half:], sin[:, half:])


def test_llama3_scaling_covers_every_band():
    plain = rope_tables.rope_inverse_frequencies(32, 500000.0, None)
    scaled = rope_tables.rope_inverse_frequencies(32, 500000.0, ROPE_SCALINGS["llama3"][0])
    ratio = plain / scaled
    kept, divided = ratio == 1.0, torch.isclose(ratio, torch.tensor(8.0))
    assert kept.any() and divided.any() and (~kept & ~divided).any()


def test_apply_rotary_reference_equals_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim, theta = 64, 10000.0
    positions = torch.tensor([5, 0, 17, 17, 200, 3])  # packed tokens of several sequences, any order
    cache = rope_tables.rope_cos_sin_cache(head_dim, 256, theta)
    q, k = _rand(6, 4, head_dim), _rand(6, 2, head_dim, seed=1)
    cos, sin, _ = _hf_cos_sin(head_dim, positions, theta, {"rope_type": "default"})
    # HF layout: [batch, heads, seq, head_dim] with cos/sin [batch, seq, head_dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    out_q, out_k = rotary.apply_rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(out_q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (5, 1, 48), (8, 2, 64)])
@interpreted
def test_interpreted_apply_rotary_kernel_matches_reference(heads, kv_heads, head_dim, dtype):
    q, k = _qkv_views(11, heads, kv_heads, head_dim, dtype)
    positions = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(4))
    cache = rope_tables.rope_cos_sin_cache(head_dim, 512, 10000.0, ROPE_SCALINGS["llama3"][0])
    q_before, k_before = q.clone(), k.clone()
    out_q, out_k = rotary.apply_rotary(q, k, positions, cache)
    ref_q, ref_k = rotary.apply_rotary_ref(q, k, positions, cache)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_q, ref_q, **tol)
    torch.testing.assert_close(out_k, ref_k, **tol)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)  # out of place: inputs untouched
    assert out_q.is_contiguous() and out_k.is_contiguous()


def _qkv_and_cache(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype, cache_dtype, device="cpu"):
    """q, k, v strided views of a fused qkv output, two empty paged caches (blocks of 4 slots) and
    shuffled slots with one padding token (-1); scales for a quantized cache."""
    fused = _rand(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype).to(device)
    q = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = fused[:, heads * head_dim: (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = fused[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    num_blocks = tokens // 2 + 2
    slots = torch.randperm(num_blocks * 4, generator=torch.Generator().manual_seed(7))[:tokens].to(device)
    slots[tokens // 2] = -1
    caches = [torch.zeros(num_blocks, 4, kv_heads, head_dim, device=device).to(cache_dtype) for _ in range(4)]
    scales = {}
    if cache_dtype in (torch.float8_e4m3fn, torch.int8):
        scales = dict(k_scale=torch.tensor(0.03, device=device), v_scale=torch.tensor(0.02, device=device))
    return q, k, v, slots, caches, scales


@pytest.mark.parametrize("cache_dtype", ["same", torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 32), (5, 1, 48), (8, 2, 64)])
@interpreted
def test_interpreted_rotary_write_kv_matches_rotate_then_write(heads, kv_heads, head_dim, dtype, cache_dtype):
    cache_dtype = dtype if cache_dtype == "same" else cache_dtype
    q, k, v, slots, caches, scales = _qkv_and_cache(9, heads, kv_heads, head_dim, dtype, cache_dtype)
    positions = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(4))
    cos_sin = rope_tables.rope_cos_sin_cache(head_dim, 512, 10000.0, ROPE_SCALINGS["llama3"][0])
    out_q = rotary.rotary_write_kv(q, k, v, positions, cos_sin, caches[0], caches[1], slots, **scales)
    ref_q = rotary.rotary_write_kv_ref(q, k, v, positions, cos_sin, caches[2], caches[3], slots, **scales)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out_q, ref_q, **tol)
    if cache_dtype == dtype:
        torch.testing.assert_close(caches[0], caches[2], **tol)
        torch.testing.assert_close(caches[1], caches[3], **tol)
    else:  # quantized: at most one step of the cache's grid apart (rounding of near-ties)
        for got, want, scale in ((caches[0], caches[2], scales["k_scale"]), (caches[1], caches[3], scales["v_scale"])):
            step = 16.0 * scale if cache_dtype == torch.float8_e4m3fn else scale
            assert (got.float() * scale - want.float() * scale).abs().max() <= step
    assert caches[0].float().abs().sum() > 0  # something was written


def test_rotary_rejects_bad_inputs():
    cache = rope_tables.rope_cos_sin_cache(32, 16, 10000.0)
    q, k = _rand(2, 2, 32), _rand(2, 1, 32)
    with pytest.raises(LlmxError, match="beyond the rotary table"):
        rotary.apply_rotary_ref(q, k, torch.tensor([3, 16]), cache)
    with pytest.raises(LlmxError, match="positions must be int64"):
        rotary.apply_rotary_ref(q, k, torch.tensor([3, 4], dtype=torch.int32), cache)
    with pytest.raises(LlmxError, match="not supported"):
        rope_tables.rope_cos_sin_cache(32, 16, 10000.0, RopeScaling(type="su", factor=2.0))
    with pytest.raises(LlmxError, match="even"):
        rope_tables.rope_cos_sin_cache(33, 16, 10000.0)


# ----------------------------------------------------------------------------------------------------
# Compiled kernels on a GPU (bf16, Llama-3-8B sizes): evidence for the device run, skipped on CPU.
# ----------------------------------------------------------------------------------------------------

_BF16_TOL = dict(atol=1e-2, rtol=1.6e-2)  # one bf16 rounding step


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 4097])
def test_gpu_rms_norm_kernels_match_reference_bf16(rows):
    x, residual = _rand(rows, 4096, dtype=torch.bfloat16).cuda(), _rand(rows, 4096, dtype=torch.bfloat16).cuda()
    weight = _rand(4096, dtype=torch.bfloat16, seed=2).cuda()
    torch.testing.assert_close(norm.rms_norm(x, weight, 1e-5), norm.rms_norm_ref(x, weight, 1e-5), **_BF16_TOL)
    y, summed = norm.fused_add_rms_norm(x, residual, weight, 1e-5)
    y_ref, summed_ref = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(summed, summed_ref)
    torch.testing.assert_close(y, y_ref, **_BF16_TOL)
    q, _ = _qkv_views(rows, 32, 8, 128, torch.bfloat16)
    head_weight = _rand(128, dtype=torch.bfloat16, seed=3).cuda()
    torch.testing.assert_close(norm.rms_norm_heads(q.cuda(), head_weight, 1e-6),
                               norm.rms_norm_heads_ref(q.cuda(), head_weight, 1e-6), **_BF16_TOL)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_rotary_write_kv_matches_reference_bf16(cache_dtype):
    q, k, v, slots, caches, scales = _qkv_and_cache(257, 32, 8, 128, torch.bfloat16, cache_dtype, device="cuda")
    positions = torch.randint(0, 8192, (257,), generator=torch.Generator().manual_seed(5)).cuda()
    cos_sin = rope_tables.rope_cos_sin_cache(128, 8192, 500000.0, ROPE_SCALINGS["llama3"][0]).cuda()
    out_q = rotary.rotary_write_kv(q, k, v, positions, cos_sin, caches[0], caches[1], slots, **scales)
    ref_q = rotary.rotary_write_kv_ref(q, k, v, positions, cos_sin, caches[2], caches[3], slots, **scales)
    torch.testing.assert_close(out_q, ref_q, **_BF16_TOL)
    # Both round the rotated k to bf16 first; the quantized stores then agree up to one grid step.
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got.float(), want.float(), atol=16.0 if cache_dtype != torch.bfloat16 else 1e-2,
                                   rtol=0.13 if cache_dtype != torch.bfloat16 else 1.6e-2)


@needs_cuda
@pytest.mark.gpu
def test_gpu_apply_rotary_matches_reference_bf16():
    q, k = _qkv_views(2048, 32, 8, 128, torch.bfloat16)
    q, k = q.cuda(), k.cuda()
    positions = torch.randint(0, 8192, (2048,), generator=torch.Generator().manual_seed(5)).cuda()
    cache = rope_tables.rope_cos_sin_cache(128, 8192, 500000.0, ROPE_SCALINGS["llama3"][0]).cuda()
    out_q, out_k = rotary.apply_rotary(q, k, positions, cache)
    ref_q, ref_k = rotary.apply_rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(out_q, ref_q, **_BF16_TOL)
    torch.testing.assert_close(out_k, ref_k, **_BF16_TOL)

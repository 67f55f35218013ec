"""fused_moe (kernels/fused_moe.py): the token sort by expert, and the two grouped GEMMs against the torch
reference under Triton's CPU interpreter (child process) and on a GPU in bf16 at Qwen3-30B-A3B's expert shapes."""

from __future__ import annotations

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.kernels import fused_moe as moe
from helpers.triton_interpreter import interpreted, needs_cuda, run_interpreted_tests, runs_children


@runs_children
def test_kernels_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


def _problem(tokens, hidden, inter, experts, top_k, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    probs = torch.softmax(torch.randn(tokens, experts, generator=g), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(5, 4, 2, 16), (1, 128, 8, 16), (300, 8, 2, 64)])
def test_align_groups_every_slot_once_under_its_expert(tokens, experts, top_k, block_m):
    ids = _problem(tokens, 8, 8, experts, top_k)[4]
    slots, block_experts = moe.align_by_expert(ids, experts, block_m)
    n = tokens * top_k
    real = slots[slots < n]
    assert sorted(real.tolist()) == list(range(n))  # each (token, choice) slot exactly once
    flat = ids.reshape(-1)
    for b, e in enumerate(block_experts.tolist()):
        block = slots[b * block_m:(b + 1) * block_m]
        block = block[block < n]
        if e < 0:
            assert block.numel() == 0
        else:
            assert block.numel() > 0 and bool((flat[block.long()] == e).all())
    # The groups of one expert are contiguous and in slot order (a stable sort).
    assert torch.equal(real.long(), torch.argsort(flat, stable=True))


def test_reference_equals_experts_one_by_one():
    x, w13, w2, weights, ids = _problem(7, 16, 12, 4, 2)
    expect = torch.zeros_like(x)
    for t in range(7):
        for j in range(2):
            e = ids[t, j]
            gate, up = (w13[e] @ x[t]).chunk(2)
            expect[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe.fused_moe_ref(x, w13, w2, weights, ids), expect, atol=1e-5, rtol=1e-5)


def _drop_odd_experts(weights, ids):
    """Expert parallelism's view of a rank holding the even experts: the others' pairs dropped (id -1)."""
    keep = ids % 2 == 0
    return weights * keep, torch.where(keep, ids, -1)


def test_dropped_pairs_contribute_nothing():
    x, w13, w2, weights, ids = _problem(9, 16, 12, 6, 2)
    kept_weights, dropped_ids = _drop_odd_experts(weights, ids)
    # Same as routing the odd experts' pairs with weight 0.
    expect = moe.fused_moe_ref(x, w13, w2, kept_weights, torch.where(dropped_ids < 0, 0, dropped_ids))
    torch.testing.assert_close(moe.fused_moe_ref(x, w13, w2, weights, dropped_ids), expect, atol=1e-6, rtol=1e-6)
    slots, block_experts = moe.align_by_expert(dropped_ids, 6, 16)
    assert sorted(slots[slots < 18].tolist()) == list(range(18))
    assert set(block_experts.tolist()) <= {-1, 0, 2, 4}


def test_rejects_mismatched_shapes():
    x, w13, w2, weights, ids = _problem(3, 16, 12, 4, 2)
    with pytest.raises(LlmxError, match="shapes disagree"):
        moe.fused_moe_ref(x, w13, w2[:, :, :6], weights, ids)
    with pytest.raises(LlmxError, match=r"\[tokens, top_k\]"):
        moe.fused_moe_ref(x, w13, w2, weights[:, :1], ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,hidden,inter,experts,top_k",
                         [(1, 64, 32, 8, 2), (9, 32, 48, 4, 2), (40, 64, 32, 3, 3)])
@interpreted
def test_interpreted_fused_moe_matches_reference(tokens, hidden, inter, experts, top_k, dtype):
    x, w13, w2, weights, ids = _problem(tokens, hidden, inter, experts, top_k, dtype=dtype)
    out = moe.fused_moe(x, w13, w2, weights, ids)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(out, moe.fused_moe_ref(x, w13, w2, weights, ids), **tol)
    assert out.shape == x.shape and out.dtype == dtype


@interpreted
def test_interpreted_fused_moe_drops_pairs_of_other_ranks():
    x, w13, w2, weights, ids = _problem(11, 32, 32, 6, 2)
    weights, ids = _drop_odd_experts(weights, ids)
    torch.testing.assert_close(moe.fused_moe(x, w13, w2, weights, ids), moe.fused_moe_ref(x, w13, w2, weights, ids),
                               atol=1e-4, rtol=1e-4)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 300, 2048])
def test_gpu_fused_moe_matches_reference_bf16_qwen3_30b_shapes(tokens):
    """Qwen3-30B-A3B's experts: hidden 2048, moe_intermediate 768, 128 experts, top-8."""
    x, w13, w2, weights, ids = _problem(tokens, 2048, 768, 128, 8, dtype=torch.bfloat16, device="cuda")
    out = moe.fused_moe(x, w13, w2, weights, ids)
    ref = moe.fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@needs_cuda
@pytest.mark.gpu
def test_gpu_fused_moe_replays_in_a_cuda_graph():
    x, w13, w2, weights, ids = _problem(8, 256, 128, 16, 2, dtype=torch.bfloat16, device="cuda")
    moe.fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w13, w2, weights, ids)
    new_ids = torch.roll(ids, 1, dims=0)
    ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(out, moe.fused_moe_ref(x, w13, w2, weights, ids), atol=2e-2, rtol=2e-2)


def _fp8_problem(tokens, hidden, inter, experts, top_k, dtype=torch.float32, device="cpu"):
    """Experts quantized as llmx's fp8 format stores them: e4m3 weights, a scale per expert, static input scales."""
    from llmx.kernels.activation import silu_and_mul_ref
    from llmx.formats.weights.fp8 import fp8_scale, to_fp8

    x, w13, w2, weights, ids = _problem(tokens, hidden, inter, experts, top_k, dtype=dtype)
    w13_scale = fp8_scale(w13.float().abs().amax(dim=(1, 2)))
    w2_scale = fp8_scale(w2.float().abs().amax(dim=(1, 2)))
    w13q = torch.stack([to_fp8(w13[e], w13_scale[e]) for e in range(experts)])
    w2q = torch.stack([to_fp8(w2[e], w2_scale[e]) for e in range(experts)])
    act_amax = max(silu_and_mul_ref(x.float() @ w13[e].float().T).abs().amax() for e in range(experts))
    a13_scale, a2_scale = fp8_scale(x.float().abs().amax()), fp8_scale(act_amax)  # calibrated on these tokens
    tensors = (x, w13q, w13_scale, a13_scale, w2q, w2_scale, a2_scale, weights, ids)
    return [t.to(device) for t in tensors], (w13, w2)


def test_fp8_reference_is_close_to_the_unquantized_experts():
    (x, w13q, s13, a13, w2q, s2, a2, weights, ids), (w13, w2) = _fp8_problem(9, 32, 24, 4, 2)
    out = moe.fused_moe_fp8_ref(x, w13q, s13, a13, w2q, s2, a2, weights, ids)
    exact = moe.fused_moe_ref(x, w13, w2, weights, ids)
    assert (out - exact).norm() / exact.norm() < 0.1  # e4m3 keeps 3 mantissa bits
    with pytest.raises(LlmxError, match="must be float8_e4m3fn"):
        moe.fused_moe_fp8_ref(x, w13, s13, a13, w2q, s2, a2, weights, ids)


@interpreted
def test_interpreted_fused_moe_fp8_matches_reference():
    (x, w13q, s13, a13, w2q, s2, a2, weights, ids), _ = _fp8_problem(13, 64, 32, 6, 2)
    weights, ids = _drop_odd_experts(weights, ids)
    torch.testing.assert_close(moe.fused_moe_fp8(x, w13q, s13, a13, w2q, s2, a2, weights, ids),
                               moe.fused_moe_fp8_ref(x, w13q, s13, a13, w2q, s2, a2, weights, ids),
                               atol=1e-3, rtol=1e-3)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 2048])
def test_gpu_fused_moe_fp8_matches_reference_qwen3_30b_shapes(tokens):
    tensors, _ = _fp8_problem(tokens, 2048, 768, 128, 8, dtype=torch.bfloat16, device="cuda")
    out = moe.fused_moe_fp8(*tensors)
    ref = moe.fused_moe_fp8_ref(*tensors)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)

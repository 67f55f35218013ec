"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that a decode layer's kernel chain
replayed from a CUDA graph with PDL gives bit-identical results to the same chain without it.

The chain test needs a Hopper GPU (compute capability 9.0+); it is skipped, with the reason, elsewhere.
Each kernel of the chain reads what the previous one wrote (a read-after-write hazard PDL must respect)
and the graph reuses its memory pool (write-after-read), so a kernel touching memory before its wait
would show up as a mismatch between replays with fresh inputs.
"""

from __future__ import annotations

import pytest
import torch

from helpers.triton_interpreter import IN_INTERPRETER
from llmx.kernels import pdl

hopper = pytest.mark.skipif(IN_INTERPRETER or not torch.cuda.is_available()
                            or torch.cuda.get_device_capability()[0] < 9,
                            reason="needs a CUDA GPU of compute capability 9.0+ (Hopper) for PDL")


def test_pdl_is_off_for_cpu_tensors_and_when_turned_off():
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}
    pdl.set_pdl(False)
    try:
        assert pdl.pdl_launch(torch.device("cuda", 0)) == {"PDL": False}
    finally:
        pdl.set_pdl(True)


def _layer_inputs(seed: int, hidden=512, heads=8, kv_heads=2, head_dim=64, inter=1024, group=64, blocks=8,
                  block_size=16):
    g = torch.Generator().manual_seed(seed)

    def int4(n, k):
        return (torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8).cuda(),
                (torch.rand(n, k // group, generator=g) * 0.02 + 0.002).to(torch.bfloat16).cuda())

    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    return {
        "hidden": torch.randn(1, hidden, generator=g).to(torch.bfloat16).cuda(),
        "residual": torch.randn(1, hidden, generator=g).to(torch.bfloat16).cuda(),
        "norm": (torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16).cuda(),
        "qkv": int4(q_size + 2 * kv_size, hidden), "o": int4(hidden, q_size),
        "gate_up": int4(2 * inter, hidden), "down": int4(hidden, inter),
        "k_cache": torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(torch.bfloat16).cuda(),
        "v_cache": torch.randn(blocks, block_size, kv_heads, head_dim, generator=g).to(torch.bfloat16).cuda(),
        "shape": (heads, kv_heads, head_dim, group),
    }


def _decode_layer(t: dict, static: dict) -> torch.Tensor:
    """One int4 decode layer at batch 1, as the runtime chains its kernels (twice: a second layer reads the
    first one's output and cache writes)."""
    from llmx.kernels.activation import silu_and_mul
    from llmx.kernels.paged_attention import paged_attention_decode
    from llmx.kernels.rms_norm import fused_add_rms_norm
    from llmx.kernels.rotary import rotary_write_kv
    from llmx.kernels.w4a16_gemv import w4a16_gemv

    heads, kv_heads, head_dim, group = t["shape"]
    hidden, residual = static["hidden"], static["residual"]
    for _ in range(2):
        normed, residual = fused_add_rms_norm(hidden, residual, t["norm"], 1e-5)
        qkv = w4a16_gemv(normed, *t["qkv"], group)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = rotary_write_kv(q.reshape(1, heads, head_dim), k.reshape(1, kv_heads, head_dim),
                            v.reshape(1, kv_heads, head_dim), static["positions"], static["cos_sin"],
                            t["k_cache"], t["v_cache"], static["slots"])
        attn = paged_attention_decode(q, t["k_cache"], t["v_cache"], static["block_tables"], static["seq_lens"],
                                      static["query_start_loc"], head_dim ** -0.5, num_splits=4)
        hidden = w4a16_gemv(attn.reshape(1, heads * head_dim), *t["o"], group)
        normed, residual = fused_add_rms_norm(hidden, residual, t["norm"], 1e-5)
        hidden = w4a16_gemv(silu_and_mul(w4a16_gemv(normed, *t["gate_up"], group)), *t["down"], group)
    return torch.cat([hidden, residual])


@hopper
def test_decode_chain_in_a_cuda_graph_is_bit_identical_with_and_without_pdl():
    from llmx.runtime.layers.rope_tables import rope_cos_sin_cache

    seq_len = 100  # 7 blocks of 16: the write goes to slot 99, attention reads 100 tokens in 4 splits
    static = {"positions": torch.tensor([seq_len - 1], device="cuda"),
              "cos_sin": rope_cos_sin_cache(64, 256, 10000.0, None).cuda(),
              "slots": torch.tensor([seq_len - 1], device="cuda"),
              "block_tables": torch.arange(8, dtype=torch.int32, device="cuda").reshape(1, 8),
              "seq_lens": torch.tensor([seq_len], dtype=torch.int32, device="cuda"),
              "query_start_loc": torch.tensor([0, 1], dtype=torch.int32, device="cuda")}
    results = {}
    for enabled in (False, True):
        pdl.set_pdl(enabled)
        try:
            t = _layer_inputs(0)
            static["hidden"], static["residual"] = t["hidden"].clone(), t["residual"].clone()
            _decode_layer(t, static)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _decode_layer(t, static)
            outputs = []
            for seed in range(1, 6):
                fresh = _layer_inputs(seed)
                for name in ("k_cache", "v_cache"):
                    t[name].copy_(fresh[name])
                static["hidden"].copy_(fresh["hidden"])
                static["residual"].copy_(fresh["residual"])
                graph.replay()
                outputs.append(out.clone())
            # The last replay again, launched eagerly on copies of its inputs.
            replayed = {**t, "k_cache": fresh["k_cache"], "v_cache": fresh["v_cache"]}
            expected = _decode_layer(replayed, {**static, "hidden": fresh["hidden"], "residual": fresh["residual"]})
        finally:
            pdl.set_pdl(True)
        assert torch.equal(outputs[-1], expected), f"PDL {enabled}: graph replay differs from eager launches"
        results[enabled] = torch.stack(outputs)
    assert torch.isfinite(results[True]).all()
    assert torch.equal(results[True], results[False])

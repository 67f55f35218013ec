"""TP/PP split rules: slices reproduce the full computation; impossible layouts are refused with arithmetic."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from llmx.formats.checkpoint import checkpoint_tensor_specs
from llmx.formats.shard import (kv_head_start, kv_heads_per_rank, layout_summary, rank_holds, shard_spec, shard_tensor,
                                stage_layers, validate_mapping, vocab_per_rank)
from llmx.common.errors import LlmxError
from llmx.formats.weights import METHODS, QuantMethod, TensorSpec
from llmx.formats.config import Mapping, ModelConfig, QuantConfig


def _model(**kw) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", family="llama", vocab_size=256, hidden_size=64,
                intermediate_size=128, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=8,
                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e4)
    return ModelConfig(**{**base, **kw})


def _random_weights(model: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s.shape, generator=g) for n, s in checkpoint_tensor_specs(model, "float32", None).items()}


def _rank_tensors(weights, model, mapping, rank):
    specs = checkpoint_tensor_specs(model, "float32", None)
    return {n: shard_tensor(n, t, specs[n], model, mapping, rank) for n, t in weights.items()
            if rank_holds(n, model, mapping, rank)}


def test_stage_layers_are_contiguous_and_balanced():
    assert [list(stage_layers(5, 2, p)) for p in range(2)] == [[0, 1, 2], [3, 4]]
    stages = [stage_layers(32, 3, p) for p in range(3)]
    assert [len(s) for s in stages] == [11, 11, 10]
    assert [i for s in stages for i in s] == list(range(32))
    assert list(stage_layers(4, 1, 0)) == [0, 1, 2, 3]


def test_pipeline_placement_of_embedding_head_and_layers():
    m, tied = _model(), _model(tie_word_embeddings=True)
    mp = Mapping(tp=2, pp=2)
    for rank in range(4):
        last = mp.pp_rank(rank) == 1
        assert rank_holds("embed.weight", m, mp, rank) == (not last)
        assert rank_holds("embed.weight", tied, mp, rank)  # the tied head reads it on the last stage
        assert rank_holds("final_norm.weight", m, mp, rank) == last
        assert rank_holds("lm_head.weight", m, mp, rank) == last
        assert rank_holds("layers.1.attn.q_proj.weight", m, mp, rank) == (not last)
        assert rank_holds("layers.2.mlp.down_proj.weight", m, mp, rank) == last


@pytest.mark.parametrize("tp, kv_heads", [(2, 2), (4, 4), (4, 2), (8, 2), (2, 1)])
def test_tp_slices_reproduce_the_full_layer(tp, kv_heads):
    """Per rank: q/k/v heads line up (GQA groups intact, KV replicated when tp > kv heads); the partial
    o_proj and MLP outputs sum to the full ones (what the all-reduce computes)."""
    m = _model(num_kv_heads=kv_heads, qkv_bias=True, o_bias=True)
    mp = Mapping(tp=tp)
    validate_mapping(m, mp, None)
    w = _random_weights(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, m.hidden_size, generator=g)
    hd, group = m.head_dim, m.num_heads // m.num_kv_heads

    q_full = (x @ w["layers.0.attn.q_proj.weight"].T + w["layers.0.attn.q_proj.bias"]).view(3, m.num_heads, hd)
    k_full = (x @ w["layers.0.attn.k_proj.weight"].T + w["layers.0.attn.k_proj.bias"]).view(3, kv_heads, hd)
    attn_full = torch.randn(3, m.num_heads * hd, generator=g)  # stand-in for the attention output feeding o_proj
    o_full = attn_full @ w["layers.0.attn.o_proj.weight"].T + w["layers.0.attn.o_proj.bias"]

    def mlp(t, x):
        gate = x @ t["layers.0.mlp.gate_proj.weight"].T
        up = x @ t["layers.0.mlp.up_proj.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ t["layers.0.mlp.down_proj.weight"].T

    o_sum, mlp_sum = 0, 0
    for r in range(tp):
        t = _rank_tensors(w, m, mp, r)
        heads, kvs = m.num_heads // tp, kv_heads_per_rank(kv_heads, tp)
        q = (x @ t["layers.0.attn.q_proj.weight"].T + t["layers.0.attn.q_proj.bias"]).view(3, heads, hd)
        k = (x @ t["layers.0.attn.k_proj.weight"].T + t["layers.0.attn.k_proj.bias"]).view(3, kvs, hd)
        for j in range(heads):
            global_q = r * heads + j
            assert torch.allclose(q[:, j], q_full[:, global_q], atol=1e-5)
            # The local GQA mapping (local q head -> local kv head) must pick the KV head the
            # full model pairs with this query head.
            local_kv = j // (heads // kvs)
            assert torch.allclose(k[:, local_kv], k_full[:, global_q // group], atol=1e-5)
        assert kv_head_start(kv_heads, tp, r) == (r * heads) // group
        # Row-parallel: the bias is stored whole on every rank and added once after the reduction.
        assert torch.equal(t["layers.0.attn.o_proj.bias"], w["layers.0.attn.o_proj.bias"])
        attn_local = attn_full[:, r * heads * hd:(r + 1) * heads * hd]
        o_sum = o_sum + attn_local @ t["layers.0.attn.o_proj.weight"].T
        mlp_sum = mlp_sum + mlp(t, x)
        assert torch.equal(t["layers.0.attn_norm.weight"], w["layers.0.attn_norm.weight"])
    # the sums run in another order than the full products: fp32 rounding relative to outputs of ~100s
    torch.testing.assert_close(o_sum + w["layers.0.attn.o_proj.bias"], o_full, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mlp_sum, mlp(w, x), rtol=1e-5, atol=1e-4)


def test_vocab_parallel_pads_the_last_slice_with_zeros():
    m = _model(vocab_size=250)
    mp = Mapping(tp=4)
    w = _random_weights(m)
    assert vocab_per_rank(250, 4) == 63
    pieces = [_rank_tensors(w, m, mp, r) for r in range(4)]
    for name in ("embed.weight", "lm_head.weight"):
        assert all(p[name].shape == (63, 64) for p in pieces)
        stacked = torch.cat([p[name] for p in pieces])
        assert torch.equal(stacked[:250], w[name])
        assert torch.all(stacked[250:] == 0)
    # Logits of the padded head, gathered and cut to the vocabulary, equal the full head's.
    h = torch.randn(2, 64)
    gathered = torch.cat([h @ p["lm_head.weight"].T for p in pieces], dim=-1)[:, :250]
    assert torch.allclose(gathered, h @ w["lm_head.weight"].T, atol=1e-5)
    assert layout_summary(m, mp)["padded_vocab_size"] == 252


def test_tiny_vocab_with_whole_empty_slices():
    m = _model(vocab_size=5, num_heads=8, num_kv_heads=8)
    mp = Mapping(tp=8)
    w = _random_weights(m)
    pieces = [_rank_tensors(w, m, mp, r)["embed.weight"] for r in range(8)]
    assert all(p.shape == (1, 64) for p in pieces)
    assert torch.equal(torch.cat(pieces)[:5], w["embed.weight"]) and torch.all(torch.cat(pieces)[5:] == 0)


@pytest.mark.parametrize("model_kw, mapping, message", [
    ({}, Mapping(tp=3), "tp 3 does not divide the 8 attention heads (8 / 3 = 2.66667); choose a tp among 1, 2, 4, 8"),
    ({"num_heads": 12, "num_kv_heads": 4, "head_dim": 8}, Mapping(tp=6),
     "tp 6 neither divides the 4 KV heads nor is a multiple of them"),
    ({"intermediate_size": 100}, Mapping(tp=8), "tp 8 does not divide intermediate_size 100 (100 / 8 = 12.50)"),
    ({}, Mapping(pp=5), "pp 5 exceeds the model's 4 layers"),
    ({}, Mapping(tp=0), "--tp must be a positive integer, got 0"),
])
def test_impossible_mappings_are_refused_with_arithmetic(model_kw, mapping, message):
    with pytest.raises(LlmxError) as info:
        validate_mapping(_model(**model_kw), mapping, None)
    assert message in info.value.message


class _GroupInt4(QuantMethod):
    """A test format shaped like group-wise int4: packed weight, group scales, a per-tensor input scale."""

    name = "test_group_int4"

    def __init__(self, group: int):
        self.group = group

    def weight_specs(self, out_features: int, in_features: int, act_dtype: str) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features // 2), "uint8", out_dim=(0, 1), in_dim=(1, 2)),
            "weight_scale": TensorSpec((out_features, in_features // self.group), act_dtype, out_dim=(0, 1),
                                       in_dim=(1, self.group)),
            "input_scale": TensorSpec((), "float32"),
        }

    def fuse_outputs(self, parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"weight": torch.cat([p["weight"] for p in parts]),
                "weight_scale": torch.cat([p["weight_scale"] for p in parts]),
                "input_scale": torch.stack([p["input_scale"] for p in parts]).amax()}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        low, high = (t["weight"] & 0xF).float() - 8, (t["weight"] >> 4).float() - 8
        w = torch.stack([low, high], dim=-1).reshape(t["weight"].shape[0], -1)
        return w * t["weight_scale"].float().repeat_interleave(self.group, dim=1)


@pytest.fixture
def group_int4(monkeypatch):
    def register(group: int) -> QuantConfig:
        monkeypatch.setitem(METHODS, f"test_group_int4_{group}", _GroupInt4(group))
        return QuantConfig(algo=f"test_group_int4_{group}", group_size=group, exclude=("lm_head",))
    return register


def test_group_size_not_dividing_a_row_parallel_shard_is_refused(group_int4):
    m = _model(hidden_size=1024, num_heads=8, num_kv_heads=8, head_dim=128, intermediate_size=1536)
    quant = group_int4(256)
    validate_mapping(m, Mapping(tp=2), quant)  # 1,536 / 2 = 768 = 3 groups
    with pytest.raises(LlmxError) as info:
        validate_mapping(m, Mapping(tp=4), quant)
    assert info.value.message.startswith(
        "group size 256 does not divide the row-parallel shard of 1,536 / 4 = 384 input features of "
        "layers.0.mlp.down_proj;")


def test_quantized_row_and_column_slices_dequantize_to_the_float_slices(group_int4):
    m = _model(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, num_layers=1)
    quant = group_int4(16)
    method = METHODS[quant.algo]
    mp = Mapping(tp=2)
    validate_mapping(m, mp, quant)
    specs = checkpoint_tensor_specs(m, "float32", quant)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for n, s in specs.items():
        if s.dtype == "uint8":
            tensors[n] = torch.randint(0, 256, s.shape, generator=g, dtype=torch.uint8)
        else:
            tensors[n] = torch.rand(s.shape, generator=g) + 0.5
    for module, style in (("layers.0.mlp.down_proj", "row"), ("layers.0.attn.k_proj", "kv")):
        full = method.dequantize({s: tensors[f"{module}.{s}"] for s in ("weight", "weight_scale")})
        for r in range(2):
            piece = {s: shard_tensor(f"{module}.{s}", tensors[f"{module}.{s}"], specs[f"{module}.{s}"], m, mp, r)
                     for s in ("weight", "weight_scale", "input_scale")}
            for s, t in piece.items():
                assert tuple(t.shape) == shard_spec(f"{module}.{s}", specs[f"{module}.{s}"], m, mp, r).shape
            assert torch.equal(piece["input_scale"], tensors[f"{module}.input_scale"])  # per-tensor: replicated
            deq = method.dequantize(piece)
            if style == "row":
                assert torch.equal(deq, full[:, r * 64:(r + 1) * 64])
            else:
                assert torch.equal(deq, full[r * 16:(r + 1) * 16])

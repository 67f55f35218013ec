"""The decoder-only transformer shared by the Llama, Mistral, Qwen2, Qwen3 and Phi-3 families, and by the
mixtures of experts Mixtral, Qwen2-MoE and Qwen3-MoE (whose sparse layers hold moe.SparseMoE in place of the MLP).

These families differ only in switches of ModelConfig (q/k/v bias, o bias, q/k norm, sliding window,
RoPE scaling, partial rotary, tied embeddings, sparse layers), so one module implements them all; a family whose
block structure differs gets a file of its own next to this one (gemma.py).

Module names equal the engine's tensor names (`layers.3.attn.qkv_proj` holds `layers.3.attn.qkv_proj.weight`),
so loading is a walk over named modules. With pipeline parallelism a model holds only its stage's
layers, under their global indices.
"""

from __future__ import annotations

import torch
from torch import nn

from llmx.formats.config import ModelConfig, QuantConfig
from llmx.formats.shard import kv_heads_per_rank, stage_layers, vocab_per_rank
from llmx.formats.weights import method_for
from llmx.kernels import ops
from llmx.runtime.distributed import ParallelContext
from llmx.runtime.layers.attention import Attention, AttentionMetadata
from llmx.runtime.layers.embedding import LMHead, VocabEmbedding
from llmx.runtime.layers.linear import Linear
from llmx.runtime.layers.norm import RMSNorm
from llmx.runtime.layers.rotary import RotaryEmbedding
from llmx.runtime.models.moe import SparseMoE


class MLP(nn.Module):
    """down(silu(gate) * up). Where the gate_up format has a gated kernel for x (int4 decode rows), the
    activation runs in the gate_up GEMV, which also applies down_proj's input scale (AWQ's pre_quant_scale),
    so the down GEMV skips it (kernels/w4a16_gemv_gated.py). LLMX_FUSED_MLP=0 turns that off."""

    def __init__(self, gate_up: Linear, down: Linear):
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down
        # (down_proj's tensors without its input scale, that scale), taken on the first fused call (after loading).
        self._down_split: tuple[dict[str, torch.Tensor] | None, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.fused_mlp_enabled():
            if self._down_split is None:
                self._down_split = self.down_proj.method.split_input_scale(self.down_proj.tensors) or (None, None)
            down_tensors, down_scale = self._down_split
            gated = self.gate_up_proj.gated(x, down_scale)
            if gated is not None:
                return self.down_proj(gated, down_tensors)
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None, ctx: ParallelContext, index: int):
        super().__init__()
        tp = ctx.tp_size
        heads = config.num_heads // tp
        kv_heads = kv_heads_per_rank(config.num_kv_heads, tp)
        hd = config.head_dim
        inter = config.intermediate_size // tp
        prefix = f"layers.{index}"
        qkv = Linear(config.hidden_size, (heads + 2 * kv_heads) * hd, bias=config.qkv_bias,
                     method=method_for(quant, f"{prefix}.attn.q_proj"), parallel="column")
        o_proj = Linear(heads * hd, config.hidden_size, bias=config.o_bias,
                        method=method_for(quant, f"{prefix}.attn.o_proj"), parallel="row")
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=kv_heads,
                              head_dim=hd, qkv=qkv, o_proj=o_proj,
                              qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
                              sliding_window=config.sliding_window)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(index):
            self.mlp = SparseMoE(config, quant, ctx, index)
            return
        gate_up = Linear(config.hidden_size, 2 * inter, bias=config.mlp_bias,
                         method=method_for(quant, f"{prefix}.mlp.gate_proj"), parallel="column")
        down = Linear(inter, config.hidden_size, bias=config.mlp_bias,
                      method=method_for(quant, f"{prefix}.mlp.down_proj"), parallel="row")
        self.mlp = MLP(gate_up, down)

    def forward(self, positions, hidden, residual, meta: AttentionMetadata, rotary: RotaryEmbedding):
        if residual is None:
            residual = hidden
            hidden = self.attn_norm(hidden)
        else:
            hidden, residual = self.attn_norm(hidden, residual)
        hidden = self.attn(positions, hidden, meta, rotary)
        hidden, residual = self.mlp_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None, ctx: ParallelContext,
                 max_positions: int, device: torch.device | str):
        super().__init__()
        self.config = config
        self.ctx = ctx
        self.layer_indices = stage_layers(config.num_layers, ctx.pp_size, ctx.pp_rank)
        tied = config.tie_word_embeddings
        needs_embed = ctx.is_first_stage or (ctx.is_last_stage and tied)
        self.embed = VocabEmbedding(vocab_per_rank(config.vocab_size, ctx.tp_size)) if needs_embed else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, quant, ctx, i) for i in self.layer_indices})
        self.rotary = RotaryEmbedding(config.rotary_dim or config.head_dim, max_positions, config.rope_theta,
                                      config.rope_scaling, device)
        if ctx.is_last_stage:
            self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = LMHead(config.vocab_size, vocab_per_rank(config.vocab_size, ctx.tp_size), config.hidden_size,
                                  method_for(quant, "lm_head"), self.embed if tied else None)
        else:
            self.final_norm = None
            self.lm_head = None

    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers.values()]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """input_ids, positions [T] -> final hidden [T, hidden] (last stage) or (hidden, residual) to pass on."""
        if intermediate is None:
            hidden, residual = self.embed(input_ids), None
        else:
            hidden, residual = intermediate
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual, meta, self.rotary)
        if self.final_norm is None:
            return hidden, residual
        hidden, _ = self.final_norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [S, hidden] -> float32 logits [S, vocab] (into `out` when given)."""
        return self.lm_head(hidden, out)

"""Gemma 2 and Gemma 3 (text): the decoder block that differs from decoder.py's.

Per layer (Gemma's RMSNorm scales by 1 + w, in float32):
    x += post_attn_norm(attn(attn_norm(x)))      # q/k norm before RoPE in Gemma 3
    x += post_mlp_norm(down(gelu_tanh(gate(mlp_norm(x))) * up(mlp_norm(x))))
The embedding is scaled by sqrt(hidden_size), attention by query_pre_attn_scalar ** -0.5. Layers are
sliding-window or global (ModelConfig.layer_types); in Gemma 3 the sliding ones rotate with their own,
unscaled RoPE base (local_rope_theta) and the global ones with rope_theta and rope_scaling. Gemma 2
soft-caps attention scores and final logits (cap * tanh(x / cap)). Module names equal the engine's
tensor names, as in decoder.py.
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
from llmx.runtime.layers.norm import GemmaRMSNorm
from llmx.runtime.layers.rotary import RotaryEmbedding


class GemmaMLP(nn.Module):
    def __init__(self, gate_up: Linear, down: Linear):
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.gelu_tanh_and_mul(self.gate_up_proj(x)))


def is_sliding(config: ModelConfig, index: int) -> bool:
    return config.layer_types[index] == "sliding_attention"


class GemmaLayer(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None, ctx: ParallelContext, index: int):
        super().__init__()
        tp = ctx.tp_size
        heads = config.num_heads // tp
        kv_heads = kv_heads_per_rank(config.num_kv_heads, tp)
        hd = config.head_dim
        inter = config.intermediate_size // tp
        prefix = f"layers.{index}"
        eps = config.rms_norm_eps
        self.sliding = is_sliding(config, index)
        qkv = Linear(config.hidden_size, (heads + 2 * kv_heads) * hd, bias=config.qkv_bias,
                     method=method_for(quant, f"{prefix}.attn.q_proj"), parallel="column")
        o_proj = Linear(heads * hd, config.hidden_size, bias=config.o_bias,
                        method=method_for(quant, f"{prefix}.attn.o_proj"), parallel="row")
        self.attn_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.attn = Attention(hidden_size=config.hidden_size, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                              qkv=qkv, o_proj=o_proj, qk_norm_eps=eps if config.qk_norm else None,
                              sliding_window=config.sliding_window if self.sliding else None,
                              scale=config.query_pre_attn_scalar ** -0.5, softcap=config.attn_logit_softcapping,
                              norm_class=GemmaRMSNorm)
        self.post_attn_norm = GemmaRMSNorm(config.hidden_size, eps)
        self.mlp_norm = GemmaRMSNorm(config.hidden_size, eps)
        gate_up = Linear(config.hidden_size, 2 * inter, bias=False,
                         method=method_for(quant, f"{prefix}.mlp.gate_proj"), parallel="column")
        down = Linear(inter, config.hidden_size, bias=False,
                      method=method_for(quant, f"{prefix}.mlp.down_proj"), parallel="row")
        self.mlp = GemmaMLP(gate_up, down)
        self.post_mlp_norm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, positions, hidden, meta: AttentionMetadata, rotary: RotaryEmbedding) -> torch.Tensor:
        hidden = hidden + self.post_attn_norm(self.attn(positions, self.attn_norm(hidden), meta, rotary))
        return hidden + self.post_mlp_norm(self.mlp(self.mlp_norm(hidden)))


class GemmaModel(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None, ctx: ParallelContext,
                 max_positions: int, device: torch.device | str):
        super().__init__()
        self.config = config
        self.ctx = ctx
        self.layer_indices = stage_layers(config.num_layers, ctx.pp_size, ctx.pp_rank)
        tied = config.tie_word_embeddings
        needs_embed = ctx.is_first_stage or (ctx.is_last_stage and tied)
        self.embed = VocabEmbedding(vocab_per_rank(config.vocab_size, ctx.tp_size)) if needs_embed else None
        self.layers = nn.ModuleDict({str(i): GemmaLayer(config, quant, ctx, i) for i in self.layer_indices})
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device)
        # Gemma 3's sliding layers: their own base, never scaled. Gemma 2 uses one RoPE for every layer.
        self.local_rotary = (RotaryEmbedding(config.head_dim, max_positions, config.local_rope_theta, None, device)
                             if config.local_rope_theta is not None else self.rotary)
        if ctx.is_last_stage:
            self.final_norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head = LMHead(config.vocab_size, vocab_per_rank(config.vocab_size, ctx.tp_size), config.hidden_size,
                                  method_for(quant, "lm_head"), self.embed if tied else None)
        else:
            self.final_norm = None
            self.lm_head = None

    def attention_layers(self) -> list[Attention]:
        return [layer.attn for layer in self.layers.values()]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: tuple[torch.Tensor, torch.Tensor] | None = None):
        """input_ids, positions [T] -> final hidden [T, hidden] (last stage) or (hidden, hidden) to pass on
        (Gemma carries no separate residual; the pair keeps decoder.py's stage interface)."""
        if intermediate is None:
            embedded = self.embed(input_ids)
            # transformers rounds sqrt(hidden_size) to the weights' dtype: through float32 in Gemma 3, directly
            # in Gemma 2 (two roundings can differ in bfloat16).
            normalizer = torch.tensor(self.config.hidden_size ** 0.5,
                                      dtype=torch.float32 if self.config.family == "gemma3" else embedded.dtype)
            hidden = embedded * normalizer.to(embedded.dtype)
        else:
            hidden = intermediate[0]
        for layer in self.layers.values():
            hidden = layer(positions, hidden, meta, self.local_rotary if layer.sliding else self.rotary)
        if self.final_norm is None:
            return hidden, hidden
        return self.final_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [S, hidden] -> float32 logits [S, vocab] (into `out` when given), soft-capped for Gemma 2."""
        logits = self.lm_head(hidden, out)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

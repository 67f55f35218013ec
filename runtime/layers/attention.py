"""Self-attention over the paged KV cache (GQA, optional q/k norm, sliding window, logit soft-cap, quantized KV)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmx.kernels import ops
from llmx.runtime.layers.linear import Linear
from llmx.runtime.layers.norm import RMSNorm
from llmx.runtime.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to. T = packed tokens, B = sequences.

    slot_mapping [T] int64: KV-cache slot of each new token (block * block_size + offset).
    block_tables [B, max_blocks] int32; seq_lens [B] int32: KV length of each sequence after this step;
    query_start_loc [B+1] int32: offsets of each sequence's tokens in the packed batch.
    num_leading_decodes: how many sequences at the front bring one token each (all B in a decode step).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    num_leading_decodes: int = 0


class Attention(nn.Module):
    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv: Linear, o_proj: Linear, qk_norm_eps: float | None, sliding_window: int | None,
                 scale: float | None = None, softcap: float | None = None, norm_class: type[RMSNorm] = RMSNorm):
        """num_heads / num_kv_heads are this rank's counts; qkv's rows are [q | k | v] of this rank.
        scale: the scores' factor (default head_dim ** -0.5); softcap: Gemma 2's attention-logit cap;
        norm_class: the q/k norm's kind (Gemma's (1 + w) RMSNorm)."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.q_norm = norm_class(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = norm_class(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.sliding_window = sliding_window
        # Set by the model runner once the cache is allocated: [num_blocks, block_size, kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # Quantized-KV scales (float32 scalars) from the checkpoint; None for a bf16/fp16/fp32 cache.
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                rotary: RotaryEmbedding) -> torch.Tensor:
        tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view_as(q)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view_as(k)
        q = rotary.rotate_and_cache(positions, q, k, v, self.k_cache, self.v_cache, meta,
                                    self.k_scale, self.v_scale)
        out = ops.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, self.scale, k_scale=self.k_scale,
                                  v_scale=self.v_scale, sliding_window=self.sliding_window,
                                  max_query_len=meta.max_query_len, softcap=self.softcap,
                                  num_leading_decodes=meta.num_leading_decodes)
        return self.o_proj(out.reshape(tokens, self.q_size))

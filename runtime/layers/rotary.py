"""Rotary position embedding (rotate-half / NeoX layout, as Hugging Face Llama applies it).

Most RoPE types have one cos/sin row per position, precomputed. Two depend on the sequence's length as
transformers implements them: LongRoPE uses its short factors while the sequence fits the original context
and its long factors beyond, dynamic NTK grows the base with the length. Each token then takes the length
of its own sequence after this step (meta.seq_lens), which is what transformers sees when it generates
that sequence alone; a sequence's earlier keys stay in the cache as they were rotated, as in transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from llmx.formats.config import RopeScaling
from llmx.kernels import ops
from llmx.runtime.layers.rope_tables import cos_sin_rows, dynamic_inverse_frequencies, rope_cos_sin_cache


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        self.scaling = scaling
        self.max_positions = max_positions
        kind = scaling.type if scaling is not None else None
        self.length_dependent = kind in ("longrope", "dynamic")
        # [max_positions, rotary_dim] float32: cos in [:, :rotary_dim/2], sin in [:, rotary_dim/2:]. LongRoPE
        # stacks the long-factor table under the short one: row p + max_positions is position p's long row.
        tables = [rope_cos_sin_cache(rotary_dim, max_positions, theta, scaling)]
        if kind == "longrope":
            long_len = scaling.original_max_position_embeddings + 1
            tables.append(rope_cos_sin_cache(rotary_dim, max_positions, theta, scaling, seq_len=long_len))
        self.cos_sin_cache = torch.cat(tables).to(device)

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, meta, k_scale: torch.Tensor | None,
                         v_scale: torch.Tensor | None) -> torch.Tensor:
        """positions [T] int64, q [T, Hq, D], k/v [T, Hkv, D]: stores the rotated k and v in the paged cache
        at meta.slot_mapping [T] and returns the rotated q (one kernel on GPU)."""
        table, rows = self.cos_sin_cache, positions
        if self.length_dependent:
            table, rows = self._length_rows(positions, meta)
        return ops.rotary_write_kv(q, k, v, rows, table, k_cache, v_cache, meta.slot_mapping,
                                   k_scale=k_scale, v_scale=v_scale)

    def _length_rows(self, positions: torch.Tensor, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, row of each token) for the length-dependent types, without a host sync."""
        tokens = torch.arange(positions.shape[0], device=positions.device)
        # Sequence of each packed token; padding tokens past the last sequence take the last one's length.
        seq = torch.searchsorted(meta.query_start_loc[1:].to(torch.int64), tokens, right=True)
        lengths = meta.seq_lens.to(torch.int64)[seq.clamp(max=meta.seq_lens.shape[0] - 1)]
        if self.scaling.type == "longrope":
            long = lengths > self.scaling.original_max_position_embeddings
            return self.cos_sin_cache, positions + long.to(torch.int64) * self.max_positions
        inv_freq = dynamic_inverse_frequencies(self.rotary_dim, self.theta, self.scaling, lengths)
        return cos_sin_rows(positions.float()[:, None] * inv_freq, self.scaling), tokens

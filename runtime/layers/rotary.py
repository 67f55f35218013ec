"""Rotary position embedding (rotate-half / NeoX layout, as Hugging Face Llama applies it)."""

from __future__ import annotations

import torch
from torch import nn

from llmx.runtime.config import RopeScaling
from llmx.runtime.layers import ops


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        from llmx.kernels.rotary import rope_cos_sin_cache

        # [max_positions, head_dim] float32: cos in [:, :head_dim/2], sin in [:, head_dim/2:]
        self.cos_sin_cache = rope_cos_sin_cache(head_dim, max_positions, theta, scaling).to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [T] int64, q [T, Hq, D], k [T, Hkv, D] -> rotated (q, k) in their dtype."""
        return ops.apply_rotary(q, k, positions, self.cos_sin_cache)

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

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
        """positions [T] int64, q [T, Hq, D], k/v [T, Hkv, D]: stores the rotated k and v in the paged cache
        at slot_mapping [T] and returns the rotated q (one kernel on GPU)."""
        return ops.rotary_write_kv(q, k, v, positions, self.cos_sin_cache, k_cache, v_cache, slot_mapping,
                                   k_scale=k_scale, v_scale=v_scale)

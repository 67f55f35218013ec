"""RoPE cos/sin tables for each scaling type, built with the same float32 operations as transformers' rotary
embedding (bit-identical on CPU).

A table is [rows, rotary_dim] float32 with cos(p * f) in [:, :rotary_dim/2] and sin(p * f) in [:, rotary_dim/2:],
f the (possibly scaled) inverse frequency of each dimension pair; the rotary kernels (llmx.kernels.rotary) read it.
"""

from __future__ import annotations

import math

import torch

from llmx.common.errors import LlmxError
from llmx.formats.config import ROPE_SCALING_TYPES, RopeScaling


def rope_inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None,
                             seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] float32, op for op as transformers computes them for each RoPE type.

    seq_len: the sequence's length, for the types whose frequencies depend on it (dynamic, longrope); None
    means "within the original context".
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.factor <= 0:
        raise LlmxError(f"rope_scaling.factor must be positive, got {scaling.factor}; fix the model config.")
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type == "llama3":
        return _llama3_inverse_frequencies(inv_freq, scaling)
    if scaling.type == "yarn":
        return _yarn_inverse_frequencies(rotary_dim, theta, scaling)
    if scaling.type == "longrope":
        long = seq_len is not None and seq_len > scaling.original_max_position_embeddings
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        if factors.numel() != rotary_dim // 2:
            raise LlmxError(f"rope_scaling: longrope needs {rotary_dim // 2} factors, got {factors.numel()}; "
                            "fix the model config.")
        return 1.0 / (factors * theta ** exponents)
    if scaling.type == "dynamic":
        if seq_len is None or seq_len <= scaling.original_max_position_embeddings:
            return inv_freq
        return dynamic_inverse_frequencies(rotary_dim, theta, scaling, torch.tensor([seq_len]))[0]
    raise LlmxError(f"rope_scaling.type {scaling.type!r} is not supported; use one of "
                    f"{', '.join(ROPE_SCALING_TYPES)} or no scaling.")


def dynamic_inverse_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling,
                                seq_lens: torch.Tensor) -> torch.Tensor:
    """Dynamic-NTK inverse frequencies [N, rotary_dim/2] for sequence lengths seq_lens [N] int64 (any device).

    transformers' formula on a tensor length: the base grows as (factor * L / L0 - (factor - 1)) ** (d / (d - 2))
    for L beyond the original context L0; shorter sequences keep the unscaled frequencies.
    """
    original = scaling.original_max_position_embeddings
    lengths = seq_lens.to(torch.int64).clamp(min=original)  # no host-made tensor: safe inside a CUDA graph capture
    base = theta * ((scaling.factor * lengths / original) - (scaling.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=seq_lens.device).float() / rotary_dim
    scaled = 1.0 / (base[:, None] ** exponents[None, :])
    plain = 1.0 / (theta ** exponents)
    return torch.where((seq_lens > original)[:, None], scaled, plain[None, :])


def _yarn_inverse_frequencies(dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """YaRN: interpolated (divided by factor) for long wavelengths, extrapolated for short ones, a linear ramp
    between the dims that rotate beta_slow and beta_fast times over the original context (transformers' code)."""
    factor = scaling.factor
    original = scaling.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, the band between blended.

    Mirrors transformers' `_compute_llama3_parameters` expression by expression so float32 rounding agrees.
    """
    if scaling.high_freq_factor == scaling.low_freq_factor:
        raise LlmxError("rope_scaling: llama3 needs high_freq_factor != low_freq_factor; fix the model config.")
    factor = scaling.factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin_cache(rotary_dim: int, max_pos: int, theta: float, scaling: RopeScaling | None = None,
                       seq_len: int | None = None) -> torch.Tensor:
    """[max_pos, rotary_dim] float32 on CPU: cos(p * f) in [:, :rotary_dim/2], sin(p * f) in [:, rotary_dim/2:],
    both times the scaling's attention factor (YaRN, LongRoPE). seq_len: as in rope_inverse_frequencies."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise LlmxError(f"rotary: head_dim must be a positive even number, got {rotary_dim}; check the model config.")
    if max_pos <= 0:
        raise LlmxError(f"rotary: max_pos must be positive, got {max_pos}; check max_position_embeddings.")
    if theta <= 0:
        raise LlmxError(f"rotary: rope_theta must be positive, got {theta}; check the model config.")
    inv_freq = rope_inverse_frequencies(rotary_dim, theta, scaling, seq_len)
    # transformers: position_ids.float() * inv_freq, elementwise in float32.
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return cos_sin_rows(freqs, scaling)


def cos_sin_rows(freqs: torch.Tensor, scaling: RopeScaling | None) -> torch.Tensor:
    """Angles [N, rotary_dim/2] -> [N, rotary_dim] rows of cos | sin, times the attention factor as transformers
    applies it (after cos/sin)."""
    factor = scaling.attention_factor if scaling is not None else 1.0
    return torch.cat((freqs.cos() * factor, freqs.sin() * factor), dim=-1).contiguous()

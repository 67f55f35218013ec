"""Gemma 2 / Gemma 3 (text) config.json fields -> the ModelConfig fields only they use.

Both spellings of the per-layer attention pattern are read: `layer_types` (transformers 5) or the
`sliding_window_pattern` every n-th layer is global (Gemma 3, default 6; Gemma 2 alternates, layer 0
sliding). Gemma 3's RoPE comes per layer type in `rope_parameters` {"full_attention": ..., "sliding_attention":
...} (transformers 5) or as `rope_theta` + `rope_scaling` for the global layers and `rope_local_base_freq`
for the sliding ones (older files); sliding layers never scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.formats.config import LAYER_TYPES

GEMMA_FAMILIES = ("gemma2", "gemma3")
_GLOBAL_THETA = {"gemma2": 10000.0, "gemma3": 1_000_000.0}
_LOCAL_THETA = 10000.0


def gemma_rope_source(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The config dict families._rope reads for the global layers' theta and scaling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        return {**hf, "rope_parameters": {"rope_theta": _GLOBAL_THETA[family], **params["full_attention"]}}
    return {**hf, "rope_theta": hf.get("rope_theta", _GLOBAL_THETA[family])}


def gemma_fields(hf: dict[str, Any], family: str, num_layers: int, source: Path) -> dict[str, Any]:
    """ModelConfig keyword arguments of a Gemma 2 / 3 config.json (validated, errors name `source`)."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise LlmxError(f"{source}: field `hidden_activation` is {act!r}; llmx runs {family} with "
                        "\"gelu_pytorch_tanh\" only.")
    if hf.get("use_bidirectional_attention"):
        raise LlmxError(f"{source}: field `use_bidirectional_attention` is true (an embedding model); llmx runs "
                        "causal language models only.")
    window = hf.get("sliding_window", 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise LlmxError(f"{source}: field `sliding_window` must be a positive integer, got {window!r}.")
    layer_types = hf.get("layer_types")
    if layer_types is None:
        pattern = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise LlmxError(f"{source}: field `sliding_window_pattern` must be a positive integer, got {pattern!r}.")
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise LlmxError(f"{source}: field `layer_types` must list {', '.join(LAYER_TYPES)} once per layer "
                        f"({num_layers}), got {layer_types!r:.120}.")
    fields: dict[str, Any] = {
        "hidden_act": act,
        "sliding_window": window,
        "layer_types": tuple(layer_types),
        "query_pre_attn_scalar": _number(hf, "query_pre_attn_scalar", 256, source),
        "qk_norm": family == "gemma3",
    }
    softcaps = {"gemma2": (50.0, 30.0), "gemma3": (None, None)}[family]
    for name, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), softcaps):
        fields[name] = _number(hf, name, default, source)
    if family == "gemma3":
        fields["local_rope_theta"] = _local_theta(hf, source)
    return fields


def _local_theta(hf: dict[str, Any], source: Path) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"]
        kind = local.get("rope_type", local.get("type", "default"))
        if kind != "default":
            raise LlmxError(f"{source}: `rope_parameters.sliding_attention` type {kind!r} is not supported; llmx "
                            "scales the global layers' RoPE only (\"default\" for sliding layers).")
        return _number(local, "rope_theta", _LOCAL_THETA, source)
    return _number(hf, "rope_local_base_freq", _LOCAL_THETA, source)


def _number(d: dict[str, Any], key: str, default: float | None, source: Path) -> float | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise LlmxError(f"{source}: field `{key}` must be a positive number, got {v!r}.")
    return float(v)


def gemma_hf_fields(model) -> dict[str, Any]:
    """The config.json fields transformers' Gemma2Config / Gemma3TextConfig read back into `model`."""
    hf: dict[str, Any] = {
        "hidden_activation": model.hidden_act,
        "sliding_window": model.sliding_window,
        "layer_types": list(model.layer_types),
        # transformers' config classes type it as an integer (every Gemma config holds one).
        "query_pre_attn_scalar": (int(model.query_pre_attn_scalar) if float(model.query_pre_attn_scalar).is_integer()
                                  else model.query_pre_attn_scalar),
        "attn_logit_softcapping": model.attn_logit_softcapping,
        "final_logit_softcapping": model.final_logit_softcapping,
        "attention_bias": model.qkv_bias,
        "pad_token_id": None,
    }
    if model.family == "gemma3":
        from llmx.formats.families import _rope_scaling_dict  # here: families imports this module at load

        hf["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": model.rope_theta,
                               **(_rope_scaling_dict(model.rope_scaling) or {})},
            "sliding_attention": {"rope_type": "default", "rope_theta": model.local_rope_theta},
        }
    return hf

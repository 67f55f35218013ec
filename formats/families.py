"""Supported model families: HF config.json -> ModelConfig, the inverse, and the tensor-name maps.

Llama, Mistral, Qwen2, Qwen3 and Phi-3 share one decoder block and differ only in switches (biases, q/k norm,
sliding window, RoPE scaling, partial rotary), so one reader serves them; Gemma 2 / 3 add the fields
formats/gemma_config.py reads, and the mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) those
formats/moe_config.py reads. Both config.json spellings are read:
transformers <5 writes `rope_theta` + `rope_scaling` ({"type"|"rope_type": ..., "factor": ...}),
transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", "factor", ...}).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.formats.config import ROPE_SCALING_TYPES, ModelConfig, RopeScaling, model_config_problem
from llmx.formats.config_fields import positive_int
from llmx.formats.gemma_config import GEMMA_FAMILIES, gemma_fields, gemma_hf_fields, gemma_rope_source
from llmx.formats.moe_config import EXPERTS_KEY, MOE_FAMILIES, moe_fields, moe_hf_fields

# HF `architectures[0]` -> llmx family. Must match llmx.runtime.models' registry keys.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ROPE_TYPES = ("default", *ROPE_SCALING_TYPES)
_LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_hf_config(config_path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """Read an HF folder's config.json: (the raw dict, the validated ModelConfig)."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise LlmxError(f"{config_path} is missing; a Hugging Face model folder needs its config.json.")
    try:
        hf_config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmxError(f"{config_path} is not valid JSON ({exc}); re-download the model's config.json.") from None
    return hf_config, model_config_from_hf(hf_config, config_path)


def model_config_from_hf(hf_config: dict[str, Any], source: Path) -> ModelConfig:
    """Validate an HF config.json dict (read from `source`, named in errors) and turn it into a ModelConfig."""
    if not isinstance(hf_config, dict):
        raise LlmxError(f"{source} does not hold a JSON object; re-download the model's config.json.")
    arch = _architecture(hf_config, source)
    family = SUPPORTED_ARCHITECTURES[arch]

    gemma = family in GEMMA_FAMILIES
    act = hf_config.get("hidden_act", "silu")
    if act != "silu" and not gemma:
        raise LlmxError(f"{source}: field `hidden_act` is {act!r}; llmx supports only \"silu\" for {arch}.")

    hidden = positive_int(hf_config, "hidden_size", source)
    heads = positive_int(hf_config, "num_attention_heads", source)
    kv_heads = positive_int(hf_config, "num_key_value_heads", source, default=heads)
    if heads % kv_heads:
        raise LlmxError(f"{source}: `num_attention_heads` {heads} is not a multiple of `num_key_value_heads` "
                        f"{kv_heads}; fix config.json.")
    head_dim = hf_config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise LlmxError(f"{source}: `hidden_size` {hidden} is not divisible by `num_attention_heads` {heads} "
                            "and `head_dim` is not set; add `head_dim` to config.json.")
        head_dim = hidden // heads
    else:
        head_dim = positive_int(hf_config, "head_dim", source)

    rotary_dim = _rotary_dim(hf_config, family, head_dim, source)
    theta, scaling = _rope(gemma_rope_source(hf_config, family) if gemma else hf_config, source, rotary_dim)
    attention_bias = _bool(hf_config, "attention_bias", source, default=False)
    qkv_bias, o_bias = {
        "llama": (attention_bias, attention_bias),
        "mistral": (False, False),
        "qwen2": (True, False),  # Qwen2's modeling code hard-wires bias on q/k/v and none on o
        "qwen3": (attention_bias, attention_bias),
        "phi3": (False, False),
        "gemma2": (attention_bias, attention_bias),
        "gemma3": (attention_bias, attention_bias),
        "mixtral": (False, False),
        "qwen2_moe": (_bool(hf_config, "qkv_bias", source, default=True), False),
        "qwen3_moe": (attention_bias, attention_bias),
    }[family]
    num_layers = positive_int(hf_config, "num_hidden_layers", source)

    extra = gemma_fields(hf_config, family, num_layers, source) if gemma else {
        "qk_norm": family in ("qwen3", "qwen3_moe"),
        "sliding_window": _sliding_window(hf_config, family, num_layers, source)}
    if family in MOE_FAMILIES:
        extra.update(moe_fields(hf_config, family, num_layers, source))
    model = ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=positive_int(hf_config, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=positive_int(hf_config, "intermediate_size", source),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=positive_int(hf_config, "max_position_embeddings", source),
        rms_norm_eps=_positive_float(hf_config, "rms_norm_eps", source, default=1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool(hf_config, "tie_word_embeddings", source, default=gemma),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=_bool(hf_config, "mlp_bias", source, default=False) if family == "llama" else False,
        rotary_dim=rotary_dim if rotary_dim != head_dim else None,
        **extra,
        bos_token_id=_optional_token_id(hf_config, "bos_token_id", source),
        eos_token_ids=_eos_token_ids(hf_config, source),
    )
    _check_ranges(model, hf_config, source)
    return model


# ModelConfig field -> the config.json key it is read from, where the names differ.
_HF_FIELD_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                   "num_kv_heads": "num_key_value_heads", "eos_token_ids": "eos_token_id"}


def _check_ranges(model: ModelConfig, hf: dict[str, Any], source: Path) -> None:
    """Refuse NaN, absurd sizes and what the runtime cannot run, naming the config.json key."""
    problem = model_config_problem(model)
    if problem is None:
        return
    field, text = problem
    if field is None:
        raise LlmxError(f"{source}: the model's {text}.")
    if model.family in MOE_FAMILIES:
        field = {"num_experts": EXPERTS_KEY[model.family], "sparse_layers": "mlp_only_layers"}.get(field, field)
    if field.startswith("rope_scaling.") and not hf.get("rope_scaling"):
        field = "rope_parameters." + field.removeprefix("rope_scaling.")
    elif field == "rope_theta" and "rope_theta" not in hf:
        field = "rope_parameters.rope_theta"
    raise LlmxError(f"{source}: field `{_HF_FIELD_NAMES.get(field, field)}` {text}; fix config.json.")


def _architecture(hf: dict[str, Any], source: Path) -> str:
    archs = hf.get("architectures")
    if not archs:
        raise LlmxError(f"{source}: field `architectures` is missing; add e.g. \"architectures\": "
                        "[\"LlamaForCausalLM\"] to config.json (one of "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}).")
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise LlmxError(f"{source}: field `architectures` must be a list of class names, got {archs!r}.")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LlmxError(f"{source}: architecture {arch} is not supported; llmx supports "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
    return arch


def _rope(hf: dict[str, Any], source: Path, rotary_dim: int) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise LlmxError(f"{source}: field `rope_parameters` must be an object, got {params!r}.")
    params = params or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise LlmxError(f"{source}: field `rope_theta` must be a positive number, got {theta!r}.")

    # transformers 5 folds the scaling fields into rope_parameters; older files keep them in rope_scaling.
    scaling = hf.get("rope_scaling") or params
    if not isinstance(scaling, dict):
        raise LlmxError(f"{source}: field `rope_scaling` must be an object or null, got {scaling!r}.")
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise LlmxError(f"{source}: `{field}` type {rope_type!r} is not supported; llmx supports "
                        f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "default":
        return float(theta), None
    return float(theta), _rope_scaling(hf, scaling, rope_type, f"{source}: `{field}", rotary_dim, float(theta))


def _rope_scaling(hf: dict[str, Any], scaling: dict[str, Any], rope_type: str, where: str, rotary_dim: int,
                  theta: float) -> RopeScaling:
    """The scaling dict of config.json -> RopeScaling with every value transformers derives resolved
    (original context, factor, YaRN / LongRoPE attention factor), so the runtime needs no other field."""
    max_positions = hf.get("max_position_embeddings")

    def number(name: str, default: float | None = None, positive: bool = True) -> float:
        v = scaling.get(name, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (positive and v <= 0) or v != v:
            raise LlmxError(f"{where}.{name}` must be a positive number for rope type {rope_type!r}, got {v!r}.")
        return float(v)

    values: dict[str, Any] = {}
    if rope_type in ("linear", "dynamic", "llama3"):
        values["factor"] = number("factor")
    if rope_type == "llama3":
        values.update(low_freq_factor=number("low_freq_factor"), high_freq_factor=number("high_freq_factor"),
                      original_max_position_embeddings=int(number("original_max_position_embeddings")))
    if rope_type == "dynamic":
        # transformers scales from max_position_embeddings (the model's context, not a rope field).
        values["original_max_position_embeddings"] = int(number("max_position_embeddings", max_positions))
    if rope_type in ("yarn", "longrope"):
        # Phi-3 keeps the pretraining context at the top level, and transformers prefers it there.
        original = hf.get("original_max_position_embeddings") if rope_type == "longrope" else None
        original = int(original or number("original_max_position_embeddings", max_positions))
        factor = scaling.get("factor")
        factor = number("factor") if factor is not None else float(max_positions) / original
        values.update(original_max_position_embeddings=original, factor=factor)
    if rope_type == "yarn":
        values.update(beta_fast=number("beta_fast", 32.0), beta_slow=number("beta_slow", 1.0),
                      truncate=bool(scaling.get("truncate", True)))
        attention = scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                         if mscale and mscale_all_dim else _yarn_mscale(factor))
        values["attention_factor"] = float(attention) if attention is not None else 1.0
    if rope_type == "longrope":
        for name in ("short_factor", "long_factor"):
            factors = scaling.get(name)
            if not isinstance(factors, list) or len(factors) != rotary_dim // 2:
                raise LlmxError(f"{where}.{name}` must list {rotary_dim // 2} numbers (one per rotated pair), "
                                f"got {factors!r:.80}.")
            values[name] = tuple(float(f) for f in factors)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        values["attention_factor"] = float(attention)
    return RopeScaling(type=rope_type, **values)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (its paper's eq. 21), as transformers computes it."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _sliding_window(hf: dict[str, Any], family: str, num_layers: int, source: Path) -> int | None:
    window = hf.get("sliding_window")
    if family == "llama":
        return None
    if family in ("mistral", "phi3", "mixtral"):  # one window for every layer when set
        return None if window is None else positive_int(hf, "sliding_window", source)
    # Qwen2/Qwen3: the window is used only when use_sliding_window is set, and then only by layers
    # >= max_window_layers (or as `layer_types` lists). ModelConfig has one window for all layers.
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if not hf.get("use_sliding_window") or window is None:
            return None
        first_sliding = hf.get("max_window_layers", 0)
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    kinds = set(layer_types)
    if kinds <= {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return positive_int(hf, "sliding_window", source)
    raise LlmxError(f"{source}: layers mix sliding-window and full attention (`use_sliding_window` with "
                    "`max_window_layers` / `layer_types`); llmx supports one attention kind for all layers.")


def _rotary_dim(hf: dict[str, Any], family: str, head_dim: int, source: Path) -> int:
    """Dims of each head RoPE rotates: Phi-3's `partial_rotary_factor` (top level or in rope_parameters) of
    head_dim, rounded down as transformers does; the whole head for the other families."""
    if family != "phi3":
        return head_dim
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
        raise LlmxError(f"{source}: field `partial_rotary_factor` must be a number in (0, 1], got {fraction!r}.")
    rotary_dim = int(head_dim * fraction)
    if rotary_dim < 2 or rotary_dim % 2:
        raise LlmxError(f"{source}: `partial_rotary_factor` {fraction} of head_dim {head_dim} rotates {rotary_dim} "
                        "dims; RoPE needs an even number of at least 2, fix config.json.")
    return rotary_dim


def _positive_float(hf: dict[str, Any], key: str, source: Path, default: float) -> float:
    v = hf.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise LlmxError(f"{source}: field `{key}` must be a positive number, got {v!r}.")
    return float(v)


def _bool(hf: dict[str, Any], key: str, source: Path, default: bool) -> bool:
    v = hf.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise LlmxError(f"{source}: field `{key}` must be true or false, got {v!r}.")
    return v


def _optional_token_id(hf: dict[str, Any], key: str, source: Path) -> int | None:
    v = hf.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise LlmxError(f"{source}: field `{key}` must be a token id (integer >= 0), got {v!r}.")
    return v


def _eos_token_ids(hf: dict[str, Any], source: Path) -> tuple[int, ...]:
    v = hf.get("eos_token_id")
    ids = [] if v is None else (v if isinstance(v, list) else [v])
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise LlmxError(f"{source}: field `eos_token_id` must be a token id or a list of them, got {v!r}.")
    return tuple(ids)


def hf_config_from_model_config(model: ModelConfig, dtype: str) -> dict[str, Any]:
    """A config.json dict transformers (4.45+ and 5.x) loads into the same model as `model`.

    Uses the `rope_theta` + `rope_scaling` spelling, which both major versions read.
    """
    family = model.family
    hf: dict[str, Any] = {
        "architectures": [model.architecture],
        "model_type": {"gemma3": "gemma3_text"}.get(family, family),
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.intermediate_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": _rope_scaling_dict(model.rope_scaling),
        "tie_word_embeddings": model.tie_word_embeddings,
        "bos_token_id": model.bos_token_id,
        "eos_token_id": (model.eos_token_ids[0] if len(model.eos_token_ids) == 1
                         else list(model.eos_token_ids) or None),
        "dtype": dtype,  # transformers 5 spelling
        "torch_dtype": dtype,  # transformers 4 spelling
        "use_cache": True,
    }
    if family in ("llama", "qwen3", "qwen3_moe"):
        if model.qkv_bias != model.o_bias:
            raise ValueError(f"{model.architecture} has one `attention_bias` for q/k/v and o; "
                             f"got qkv_bias={model.qkv_bias}, o_bias={model.o_bias}")
        hf["attention_bias"] = model.qkv_bias
    if family in GEMMA_FAMILIES:
        hf.update(gemma_hf_fields(model))
        del hf["hidden_act"]
        if family == "gemma3":
            del hf["rope_theta"], hf["rope_scaling"]
    if family == "llama":
        hf["mlp_bias"] = model.mlp_bias
    if family in ("mistral", "phi3", "mixtral"):
        hf["sliding_window"] = model.sliding_window
    if family == "phi3":
        hf["partial_rotary_factor"] = (model.rotary_dim or model.head_dim) / model.head_dim
        hf["pad_token_id"] = None  # Phi3Config's default 32000 lies outside smaller vocabularies
    if family == "qwen2_moe":
        hf["qkv_bias"] = model.qkv_bias
    if family in MOE_FAMILIES:
        hf.update(moe_hf_fields(model))
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        hf["use_sliding_window"] = model.sliding_window is not None
        hf["sliding_window"] = model.sliding_window
        hf["max_window_layers"] = 0 if model.sliding_window is not None else model.num_layers
    return hf


def _rope_scaling_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling.type in ("linear", "dynamic"):
        return {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type == "yarn":
        return {"rope_type": "yarn", "factor": scaling.factor, "beta_fast": scaling.beta_fast,
                "beta_slow": scaling.beta_slow, "truncate": scaling.truncate,
                "attention_factor": scaling.attention_factor,
                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    if scaling.type == "longrope":
        return {"rope_type": "longrope", "factor": scaling.factor, "attention_factor": scaling.attention_factor,
                "short_factor": list(scaling.short_factor), "long_factor": list(scaling.long_factor),
                "original_max_position_embeddings": scaling.original_max_position_embeddings}
    return {"rope_type": scaling.type, "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings}


# Tensor names, one row per (HF name, llmx name) pair; both directions are derived from it. `{i}` is
# slot i, matched by SLOTS[i]. Linear modules keep any suffix (weight, bias, and the quantized formats'
# weight_scale, input_scale, ...), so the same rows serve quantized checkpoints.
_LAYER, _SUFFIX = r"\d+", r"[A-Za-z_][A-Za-z0-9_]*"
_NAME_PAIRS: list[tuple[str, str, tuple[str, ...]]] = [
    ("model.embed_tokens.weight", "embed.weight", ()),
    ("model.norm.weight", "final_norm.weight", ()),
    ("lm_head.{0}", "lm_head.{0}", (_SUFFIX,)),
    ("model.layers.{0}.input_layernorm.weight", "layers.{0}.attn_norm.weight", (_LAYER,)),
    ("model.layers.{0}.post_attention_layernorm.weight", "layers.{0}.mlp_norm.weight", (_LAYER,)),
    ("model.layers.{0}.self_attn.{1}_proj.{2}", "layers.{0}.attn.{1}_proj.{2}", (_LAYER, "[qkvo]", _SUFFIX)),
    ("model.layers.{0}.self_attn.{1}_norm.weight", "layers.{0}.attn.{1}_norm.weight", (_LAYER, "[qk]")),
    ("model.layers.{0}.mlp.{1}_proj.{2}", "layers.{0}.mlp.{1}_proj.{2}", (_LAYER, "gate|up|down", _SUFFIX)),
    # Mixtures of experts as the hub stores them (Qwen2-MoE, Qwen3-MoE; Mixtral's own names below): the router,
    # one gated MLP per expert, Qwen2-MoE's shared expert and its gate.
    ("model.layers.{0}.mlp.gate.weight", "layers.{0}.mlp.router.weight", (_LAYER,)),
    ("model.layers.{0}.mlp.experts.{1}.{2}_proj.{3}", "layers.{0}.mlp.experts.{1}.{2}_proj.{3}",
     (_LAYER, _LAYER, "gate|up|down", _SUFFIX)),
    ("model.layers.{0}.mlp.shared_expert.{1}_proj.{2}", "layers.{0}.mlp.shared_expert.{1}_proj.{2}",
     (_LAYER, "gate|up|down", _SUFFIX)),
    ("model.layers.{0}.mlp.shared_expert_gate.weight", "layers.{0}.mlp.shared_expert_gate.weight", (_LAYER,)),
]


def _pattern(template: str, slots: tuple[str, ...]) -> re.Pattern[str]:
    """A template with {i} slots -> a regex whose group `g{i}` matches slot i."""
    parts = re.split(r"\{(\d)\}", template)
    regex = "".join(re.escape(part) if n % 2 == 0 else f"(?P<g{part}>{slots[int(part)]})"
                    for n, part in enumerate(parts))
    return re.compile(regex)


# Phi-3 stores q/k/v and gate/up fused; convert splits them (fused_parts), so these read one way only:
# llmx names its engine's fused tensors the same, and those have no single HF counterpart.
_HF_FUSED_PAIRS = [
    ("model.layers.{0}.self_attn.qkv_proj.weight", "layers.{0}.attn.qkv_proj.weight", (_LAYER,)),
    ("model.layers.{0}.mlp.gate_up_proj.weight", "layers.{0}.mlp.gate_up_proj.weight", (_LAYER,)),
    # transformers 5 holds a layer's experts as 3-D parameters ([experts, 2 * inter, hidden] with each expert's
    # gate rows then up rows, and [experts, hidden, inter]); a folder saved from its state dict stores them so.
    ("model.layers.{0}.mlp.experts.gate_up_proj", "layers.{0}.mlp.experts.gate_up_proj", (_LAYER,)),
    ("model.layers.{0}.mlp.experts.down_proj", "layers.{0}.mlp.experts.down_proj", (_LAYER,)),
]
_HF_TO_LLMX = [(_pattern(hf, slots), llmx, len(slots)) for hf, llmx, slots in _NAME_PAIRS + _HF_FUSED_PAIRS]
_LLMX_TO_HF = [(_pattern(llmx, slots), hf, len(slots)) for hf, llmx, slots in _NAME_PAIRS]
# Gemma's four norms per layer: its post_attention_layernorm follows attention (Llama's is in front of the
# MLP, llmx's mlp_norm); pre_feedforward_layernorm is the norm in front of the MLP. Tried before the rows above.
_GEMMA_PAIRS = [
    ("model.layers.{0}.post_attention_layernorm.weight", "layers.{0}.post_attn_norm.weight", (_LAYER,)),
    ("model.layers.{0}.pre_feedforward_layernorm.weight", "layers.{0}.mlp_norm.weight", (_LAYER,)),
    ("model.layers.{0}.post_feedforward_layernorm.weight", "layers.{0}.post_mlp_norm.weight", (_LAYER,)),
]
_GEMMA_HF_TO_LLMX = [(_pattern(hf, slots), llmx, len(slots)) for hf, llmx, slots in _GEMMA_PAIRS] + _HF_TO_LLMX
_GEMMA_LLMX_TO_HF = [(_pattern(llmx, slots), hf, len(slots)) for hf, llmx, slots in _GEMMA_PAIRS] + _LLMX_TO_HF
# Mixtral's hub names: `block_sparse_moe`, experts' w1 (gate), w2 (down), w3 (up). transformers 5 renames the
# module `mlp` in memory, which the rows above read. Tried first for Mixtral, and written back this way.
_MIXTRAL_PAIRS = [
    ("model.layers.{0}.block_sparse_moe.gate.weight", "layers.{0}.mlp.router.weight", (_LAYER,)),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w1.{2}", "layers.{0}.mlp.experts.{1}.gate_proj.{2}",
     (_LAYER, _LAYER, _SUFFIX)),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w2.{2}", "layers.{0}.mlp.experts.{1}.down_proj.{2}",
     (_LAYER, _LAYER, _SUFFIX)),
    ("model.layers.{0}.block_sparse_moe.experts.{1}.w3.{2}", "layers.{0}.mlp.experts.{1}.up_proj.{2}",
     (_LAYER, _LAYER, _SUFFIX)),
]
_MIXTRAL_HF_TO_LLMX = [(_pattern(hf, slots), llmx, len(slots)) for hf, llmx, slots in _MIXTRAL_PAIRS] + _HF_TO_LLMX
_MIXTRAL_LLMX_TO_HF = [(_pattern(llmx, slots), hf, len(slots)) for hf, llmx, slots in _MIXTRAL_PAIRS] + _LLMX_TO_HF
# Buffers some exporters save next to the weights; they are recomputed, never loaded.
_HF_SKIPPED = re.compile(r"(.*\.)?rotary_emb\.inv_freq|model\.layers\.\d+\.self_attn\.rotary_emb\..*")


def hf_to_llmx_name(hf_name: str, family: str | None = None) -> str | None:
    """HF tensor name -> llmx checkpoint name; None for buffers that are not weights (rotary inv_freq).
    family: the model's family (ModelConfig.family), which decides Gemma's norm names.

    Raises ValueError for a name no supported family uses (the caller names the file in its error).
    """
    if _HF_SKIPPED.fullmatch(hf_name):
        return None
    return _translate(hf_name, _GEMMA_HF_TO_LLMX if family in GEMMA_FAMILIES else
                      _MIXTRAL_HF_TO_LLMX if family == "mixtral" else _HF_TO_LLMX)


def llmx_to_hf_name(name: str, family: str | None = None) -> str:
    """llmx checkpoint name -> HF tensor name (the inverse of hf_to_llmx_name). Raises ValueError if unknown."""
    return _translate(name, _GEMMA_LLMX_TO_HF if family in GEMMA_FAMILIES else
                      _MIXTRAL_LLMX_TO_HF if family == "mixtral" else _LLMX_TO_HF)


def _translate(name: str, table: list[tuple[re.Pattern[str], str, int]]) -> str:
    for pattern, template, num_slots in table:
        m = pattern.fullmatch(name)
        if m:
            return template.format(*(m.group(f"g{i}") for i in range(num_slots)))
    raise ValueError(f"tensor `{name}` is not part of any supported model family")


def fused_parts(name: str, model: ModelConfig) -> list[tuple[str, int, int]] | None:
    """A fused HF weight's llmx parts as (name, first row, end row), or None for a tensor stored whole.

    Phi-3's `qkv_proj` rows are q then k then v, its `gate_up_proj` rows gate then up (transformers' order).
    """
    m = re.fullmatch(r"layers\.(\d+)\.(attn\.qkv_proj|mlp\.gate_up_proj)\.weight", name)
    if m is None:
        return None
    p = f"layers.{m.group(1)}"
    if m.group(2) == "attn.qkv_proj":
        q, kv = model.q_size, model.kv_size
        return [(f"{p}.attn.q_proj.weight", 0, q), (f"{p}.attn.k_proj.weight", q, q + kv),
                (f"{p}.attn.v_proj.weight", q + kv, q + 2 * kv)]
    inter = model.intermediate_size
    return [(f"{p}.mlp.gate_proj.weight", 0, inter), (f"{p}.mlp.up_proj.weight", inter, 2 * inter)]


def split_parts(name: str, model: ModelConfig) -> list[tuple[str, tuple]] | None:
    """A fused HF tensor's llmx parts as (name, index into the stored tensor), or None for a tensor stored whole.

    Phi-3's fused rows (fused_parts), and transformers 5's 3-D experts: `experts.gate_up_proj` [experts, 2 * inter,
    hidden] gives each expert's gate_proj (rows :inter) and up_proj (rows inter:), `experts.down_proj`
    [experts, hidden, inter] each expert's down_proj.
    """
    rows = fused_parts(name, model)
    if rows is not None:
        return [(part, (slice(start, end),)) for part, start, end in rows]
    m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
    if m is None:
        return None
    p, inter = f"layers.{m.group(1)}.mlp.experts", model.moe_intermediate_size
    if m.group(2) == "down_proj":
        return [(f"{p}.{e}.down_proj.weight", (e,)) for e in range(model.num_experts)]
    return [part for e in range(model.num_experts) for part in (
        (f"{p}.{e}.gate_proj.weight", (e, slice(0, inter))), (f"{p}.{e}.up_proj.weight", (e, slice(inter, 2 * inter))))]

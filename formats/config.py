"""Frozen configuration records shared by every stage: the one source of truth for a model's shape,
its quantization, its parallel mapping and the engine's build settings.

They round-trip through plain dicts (`to_dict` / `from_dict`), which is what `llmx.json` and
`engine.json` store. Validation of user input happens where the dicts are read (llmx.formats.checkpoint,
llmx.build.engine); inside the runtime these records are trusted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmx.common.limits import MAX_PARAMETERS, MODEL_LIMITS, ROPE_SCALING_LIMITS, SETTING_LIMITS, check_number

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")
LAYER_TYPES = ("sliding_attention", "full_attention")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
# FP8 (e4m3) weights, activations or scales need FP8 hardware support, first present in Ada/Hopper (compute
# capability 8.9). Which algorithms those are is their row's `needs_fp8` (llmx.formats.presets).
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
# QuantConfig.extra key: the module patterns whose Linear keeps a `pre_quant_scale` [K] tensor (AWQ /
# SmoothQuant smoothing with no norm in front to fold it into).
PRE_QUANT_SCALE_KEY = "pre_quant_scale_modules"


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as transformers computes it for each `type` (ROPE_SCALING_TYPES):

    linear: positions divided by `factor`. dynamic (NTK): the base grows with the sequence's length once it
    passes `original_max_position_embeddings` (config.json's max_position_embeddings). yarn: frequencies
    blended between interpolation and extrapolation by `beta_fast` / `beta_slow`, cos/sin times
    `attention_factor`. llama3: Llama 3.1/3.2 wavelength-dependent. longrope: per-pair `short_factor` while
    the sequence fits `original_max_position_embeddings`, `long_factor` beyond, cos/sin times
    `attention_factor`.
    """

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_factor: float = 1.0  # yarn / longrope: cos and sin are multiplied by it (resolved at convert)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RopeScaling":
        d = dict(d)
        for key in ("short_factor", "long_factor"):
            d[key] = tuple(d.get(key) or ())
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama/Mistral/Qwen2/Qwen3/Phi-3; Gemma 2/3, whose
    block runtime/models/gemma.py documents).

    Per layer: x += o_proj(attn(rope(q_norm(q_proj(n1(x)))), rope(k_norm(k_proj(n1(x)))), v_proj(n1(x))))
               x += down_proj(silu(gate_proj(n2(x))) * up_proj(n2(x)))
    q_proj: [num_heads*head_dim, hidden_size]; k_proj, v_proj: [num_kv_heads*head_dim, hidden_size].
    """

    architecture: str  # HF `architectures[0]`, the runtime registry key
    family: str  # formats.families.SUPPORTED_ARCHITECTURES' values: llama, mistral, qwen2, ..., mixtral, qwen3_moe
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's attention_bias sets qkv_bias and o_bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1; None = full attention
    rotary_dim: int | None = None  # Phi-3 partial rotary: only the first rotary_dim dims of a head; None = head_dim
    # Gemma: per-layer "sliding_attention" (window `sliding_window`) or "full_attention"; () = every layer alike.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (unscaled); None = rope_theta
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    hidden_act: str = "silu"  # the gated MLP's activation: silu | gelu_pytorch_tanh (Gemma)
    # Mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; runtime/models/moe.py). The layers in `sparse_layers`
    # route each token to `num_experts_per_tok` of `num_experts` gated MLPs of `moe_intermediate_size`; the
    # other layers keep the dense MLP of `intermediate_size`. num_experts 0 = a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (Mixtral always does)
    sparse_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE: an always-on expert behind a sigmoid gate
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.sparse_layers

    def mlp_intermediate_size(self, module: str) -> int:
        """The intermediate size of an MLP Linear named `module` (`layers.3.mlp.experts.5.gate_proj`: an expert's;
        `...mlp.shared_expert.up_proj`: the shared expert's; any other: the dense MLP's)."""
        if ".mlp.experts." in module:
            return self.moe_intermediate_size
        if ".mlp.shared_expert." in module:
            return self.shared_expert_intermediate_size
        return self.intermediate_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
        d["sparse_layers"] = list(self.sparse_layers)
        if self.rope_scaling is not None:
            for key in ("short_factor", "long_factor"):
                d["rope_scaling"][key] = list(getattr(self.rope_scaling, key))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling.from_dict(d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        d["layer_types"] = tuple(d.get("layer_types") or ())
        d["sparse_layers"] = tuple(d.get("sparse_layers") or ())
        return cls(**d)


@dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's weights (and KV cache) are quantized; None on a checkpoint means unquantized.

    `algo` is the canonical name (fp8, fp8_pc_pt, int8_sq, int8_wo, int4_wo, int4_awq, int4_gptq,
    w4a8_awq, nvfp4, or "none" when only the KV cache is quantized); `group_size` applies to the int4 and
    nvfp4 formats; `exclude` lists module names (llmx naming, e.g. "lm_head", "layers.0.mlp.down_proj")
    left unquantized.
    """

    algo: str
    group_size: int | None = None
    kv_cache_dtype: str | None = None  # None (same as activations) | "fp8" | "int8"
    exclude: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "QuantConfig | None":
        if d is None:
            return None
        d = dict(d)
        d["exclude"] = tuple(d.get("exclude") or ())
        return cls(**d)


@dataclass(frozen=True)
class Mapping:
    """Parallel layout: tensor-parallel size times pipeline-parallel size = world size.

    ep: expert parallelism for mixtures of experts, 1 or tp: with ep = tp each rank of a tensor-parallel group holds
    num_experts / ep whole experts instead of a 1/tp slice of every expert (attention and dense MLPs stay split by
    tp). The activations are the same on every rank of the group, so routing needs no exchange of tokens: each rank
    runs its own experts on the tokens routed to them and the all-reduce that ends the layer sums the ranks.
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def pp_rank(self, rank: int) -> int:
        return rank // self.tp

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["ep"] == 1:  # files of layouts without expert parallelism read as before it existed
            del d["ep"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Mapping":
        return cls(**(d or {}))


@dataclass(frozen=True)
class BuildConfig:
    """Engine build settings (`llmx build` options) stored in engine.json."""

    max_batch_size: int = 64
    max_seq_len: int = 4096
    max_num_tokens: int = 8192  # per-step token budget (prefill chunks + decodes)
    kv_block_size: int = 16
    kv_cache_dtype: str | None = None  # None = model dtype; "fp8" | "int8" from quantization
    device: str = "cpu"  # cpu | cuda
    cuda_graph_batch_sizes: tuple[int, ...] = ()
    kernels: dict[str, Any] = field(default_factory=dict)  # kernel choice and tuned tile configs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cuda_graph_batch_sizes"] = list(self.cuda_graph_batch_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        d = dict(d)
        d["cuda_graph_batch_sizes"] = tuple(d.get("cuda_graph_batch_sizes") or ())
        return cls(**d)


def model_config_problem(model: ModelConfig) -> tuple[str | None, str] | None:
    """The first field of `model` the runtime could not run, as (field, "must be ..., got ..."), or None.
    field is None for a problem of the sizes together (the parameter count).

    Loaders of config.json, llmx.json and engine.json call it and name their file: a NaN or negative
    value, an absurd size (common.limits), a layout the attention cannot split, an odd head_dim (RoPE
    rotates pairs), a token id outside the vocabulary.
    """
    for field_name, rule in MODEL_LIMITS.items():
        value = getattr(model, field_name)
        if value is None and field_name == "sliding_window":
            continue
        allowed = check_number(value, rule)
        if allowed is not None:
            return field_name, f"must be {allowed}, got {value!r}"
    if model.num_heads % model.num_kv_heads:
        return "num_kv_heads", f"must divide num_heads {model.num_heads}, got {model.num_kv_heads}"
    if model.head_dim % 2:
        return "head_dim", f"must be even (RoPE rotates pairs of dimensions), got {model.head_dim}"
    rotary_dim = model.rotary_dim if model.rotary_dim is not None else model.head_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or not (
            0 < rotary_dim <= model.head_dim and rotary_dim % 2 == 0):
        return "rotary_dim", f"must be an even number from 2 to head_dim {model.head_dim}, got {rotary_dim!r}"
    if model.layer_types and (len(model.layer_types) != model.num_layers or not set(model.layer_types) <= set(
            LAYER_TYPES) or ("sliding_attention" in model.layer_types and model.sliding_window is None)):
        return ("layer_types", f"must name {', '.join(LAYER_TYPES)} once per layer ({model.num_layers}), with "
                f"sliding_window set for sliding layers, got {list(model.layer_types)!r:.120}")
    if model.hidden_act not in HIDDEN_ACTS:
        return "hidden_act", f"must be one of {', '.join(HIDDEN_ACTS)}, got {model.hidden_act!r}"
    for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(model, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < 1e12):
            return name, f"must be a positive number or null, got {value!r}"
    moe = moe_config_problem(model)
    if moe is not None:
        return moe
    for flag in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "norm_topk_prob"):
        if not isinstance(getattr(model, flag), bool):
            return flag, f"must be true or false, got {getattr(model, flag)!r}"
    ids = ([("bos_token_id", model.bos_token_id)] if model.bos_token_id is not None else []) + [
        ("eos_token_ids", i) for i in model.eos_token_ids]
    for field_name, token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.vocab_size:
            return field_name, f"must hold token ids from 0 to vocab_size - 1 ({model.vocab_size - 1:,}), got {token!r}"
    scaling = model.rope_scaling
    if scaling is not None:
        if scaling.type not in ROPE_SCALING_TYPES:
            return "rope_scaling.type", f"must be one of {', '.join(ROPE_SCALING_TYPES)}, got {scaling.type!r}"
        for field_name, rule in ROPE_SCALING_LIMITS.items():
            allowed = check_number(getattr(scaling, field_name), rule)
            if allowed is not None:
                return f"rope_scaling.{field_name}", f"must be {allowed}, got {getattr(scaling, field_name)!r}"
        for name in ("attention_factor", "beta_fast", "beta_slow"):
            value = getattr(scaling, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                return f"rope_scaling.{name}", f"must be a positive number below 1e6, got {value!r}"
        if scaling.type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(scaling, name)
                if len(factors) != rotary_dim // 2 or not all(
                        isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1e6 for f in factors):
                    return (f"rope_scaling.{name}", f"must list {rotary_dim // 2} positive numbers (one per rotated "
                            f"pair), got {len(factors)} values")
        if scaling.type == "llama3" and not scaling.high_freq_factor > scaling.low_freq_factor:
            return ("rope_scaling.high_freq_factor", f"must be greater than low_freq_factor "
                    f"{scaling.low_freq_factor}, got {scaling.high_freq_factor}")
    parameters = parameter_count(model)
    if parameters > MAX_PARAMETERS:
        return (None, f"sizes describe {parameters:.3g} parameters ({parameters * 2 / 1e12:.3g} TB in bfloat16), "
                f"more than the {MAX_PARAMETERS:.0e} llmx accepts: check vocab_size, hidden_size, "
                "intermediate_size and the layer count")
    return None


def moe_config_problem(model: ModelConfig) -> tuple[str, str] | None:
    """The first mixture-of-experts field the runtime could not run, as (field, "must be ..., got ..."), or None."""
    def count(value, low: int, high: int) -> bool:
        return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high

    if not count(model.num_experts, 0, 1 << 14):
        return "num_experts", f"must be an integer from 0 (dense) to {1 << 14}, got {model.num_experts!r}"
    if model.num_experts == 0:
        if model.sparse_layers or model.num_experts_per_tok:
            return "num_experts", "must be positive when sparse_layers or num_experts_per_tok are set, got 0"
        return None
    if not count(model.num_experts_per_tok, 1, model.num_experts):
        return ("num_experts_per_tok", f"must be from 1 to the {model.num_experts} experts (top-k cannot pick more "
                f"experts than there are), got {model.num_experts_per_tok!r}")
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        value = getattr(model, name)
        if value is None and name == "shared_expert_intermediate_size":
            continue
        allowed = check_number(value, MODEL_LIMITS["intermediate_size"])
        if allowed is not None:
            return name, f"must be {allowed}, got {value!r}"
    layers = model.sparse_layers
    if not layers or list(layers) != sorted(set(layers)) or not all(count(i, 0, model.num_layers - 1) for i in layers):
        return ("sparse_layers", f"must list distinct layer indices from 0 to {model.num_layers - 1} in increasing "
                f"order, at least one, got {list(layers)!r:.120}")
    return None


def parameter_count(model: ModelConfig) -> int:
    """Weights of the unquantized model (embedding, head unless tied, attention, MLP or experts, norms)."""
    h = model.hidden_size
    attention = h * (model.q_size + 2 * model.kv_size) + model.q_size * h
    sparse = len(model.sparse_layers)
    mlp = 3 * h * model.intermediate_size * (model.num_layers - sparse)
    if sparse:
        experts = model.num_experts * (3 * h * model.moe_intermediate_size + h)
        shared = 3 * h * (model.shared_expert_intermediate_size or 0)
        mlp += sparse * (experts + shared)
    embeddings = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return embeddings + model.num_layers * (attention + 2 * h) + mlp + h


def build_config_problem(build: BuildConfig) -> tuple[str, str] | None:
    """The first build setting outside what the runtime can run, as (field, "must be ..., got ..."), or None."""
    for field_name in ("max_batch_size", "max_seq_len", "max_num_tokens", "kv_block_size"):
        value = getattr(build, field_name)
        allowed = check_number(value, SETTING_LIMITS[field_name])
        if allowed is not None:
            return field_name, f"must be {allowed}, got {value!r}"
    for size in build.cuda_graph_batch_sizes:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= build.max_batch_size:
            return ("cuda_graph_batch_sizes", f"must hold sizes from 1 to max_batch_size {build.max_batch_size}, "
                    f"got {size!r}")
    if not isinstance(build.kernels, dict):
        return "kernels", f"must be an object, got {build.kernels!r}"
    return None


def mapping_problem(mapping: Mapping) -> tuple[str, str] | None:
    """tp and pp must be integers from 1 to 1,024: (field, "must be ..., got ...") or None."""
    for field_name in ("tp", "pp"):
        value = getattr(mapping, field_name)
        allowed = check_number(value, SETTING_LIMITS[field_name])
        if allowed is not None:
            return field_name, f"must be {allowed}, got {value!r}"
    if isinstance(mapping.ep, bool) or mapping.ep not in (1, mapping.tp):
        return "ep", f"must be 1 or tp ({mapping.tp}), got {mapping.ep!r}"
    return None

"""Quantization algorithms llmx offers, and the ModelOpt configuration each one runs.

Each preset names the stored weight format (llmx.quant.methods.registry), whether it needs calibration
data, and the ModelOpt `mtq.quantize` config: quantizer settings for the Linear weights and inputs plus
the calibration algorithm. Configs use ModelOpt 0.47's list form ({"quantizer_name": pattern, "cfg" |
"enable": ...}, later entries win). Only Linears of the decoder layers are quantized, plus the LM head
when asked (`llmx quantize --quantize-lm-head`): everything is disabled first, then the weight/input
quantizers of the decoder layers' Linears (and of the head, with the same settings) are switched on,
then every excluded module is switched off by exact name, so llmx never depends on ModelOpt's own
default exclusions (llmx.quant.api checks afterwards that exactly the planned Linears were quantized).

Plain data, no ModelOpt import: `llmx --help` and recipe validation read it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from llmx.common.errors import LlmxError

FP8 = (4, 3)  # ModelOpt's num_bits for float8 e4m3
FP4 = (2, 1)  # e2m1


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    weight: Any  # ModelOpt weight quantizer cfg (dict, or list for a two-stage quantizer)
    input: dict[str, Any] | None  # input quantizer cfg; None = activations not quantized
    algorithm: Any  # ModelOpt calibration algorithm ("max", {"method": ...})
    needs_calibration: bool  # activation statistics or data-driven weights (AWQ, GPTQ, SmoothQuant)
    grouped: bool = False  # weights in groups of --group-size along the input features
    fixed_group_size: int | None = None  # NVFP4's 16-element blocks
    calib_use_cache: bool = True  # layerwise GPTQ replays layers and needs forwards without a KV cache
    notes: tuple[str, ...] = field(default=())

    @property
    def layerwise(self) -> bool:
        """Whether ModelOpt calibrates layer by layer (GPTQ): modules outside the decoder layers are not visited."""
        return isinstance(self.algorithm, dict) and bool(self.algorithm.get("layerwise", {}).get("enable"))


def _int4_weight(group_size: int) -> dict[str, Any]:
    return {"num_bits": 4, "block_sizes": {-1: group_size, "type": "static"}}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fp8", "FP8 e4m3 weights and activations, per-tensor static scales",
               weight={"num_bits": FP8, "axis": None}, input={"num_bits": FP8, "axis": None},
               algorithm="max", needs_calibration=True),
        Preset("fp8_pc_pt", "FP8 weights per output channel, activations per token at run time",
               weight={"num_bits": FP8, "axis": 0}, input=None, algorithm="max", needs_calibration=False),
        Preset("int8_sq", "SmoothQuant W8A8: int8 per-channel weights, int8 per-token activations",
               weight={"num_bits": 8, "axis": 0}, input={"num_bits": 8, "axis": None},
               algorithm={"method": "smoothquant", "alpha": 0.5}, needs_calibration=True),
        Preset("int8_wo", "int8 per-channel weights, 16-bit activations (round to nearest)",
               weight={"num_bits": 8, "axis": 0}, input=None, algorithm="max", needs_calibration=False),
        Preset("int4_wo", "int4 group-wise weights, 16-bit activations (round to nearest)",
               weight="int4", input=None, algorithm="max", needs_calibration=False, grouped=True),
        Preset("int4_awq", "int4 group-wise weights chosen by AWQ (activation-aware scaling)",
               weight="int4", input=None, algorithm={"method": "awq_lite", "alpha_step": 0.1},
               needs_calibration=True, grouped=True),
        Preset("int4_gptq", "int4 group-wise weights chosen by GPTQ (Hessian-based error compensation)",
               weight="int4", input=None,
               algorithm={"method": "gptq", "layerwise": {"enable": True}},
               needs_calibration=True, grouped=True, calib_use_cache=False),
        Preset("w4a8_awq", "int4 group-wise AWQ weights with FP8 activations",
               weight="w4a8", input={"num_bits": FP8, "axis": None},
               algorithm={"method": "awq_lite", "alpha_step": 0.1}, needs_calibration=True, grouped=True),
        Preset("nvfp4", "NVFP4: e2m1 weights in blocks of 16 with e4m3 block scales and a global scale",
               weight={"num_bits": FP4, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": FP8}},
               input={"num_bits": FP4, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": FP8}},
               algorithm="max", needs_calibration=True, fixed_group_size=16),
    )
}
ALGOS: tuple[str, ...] = tuple(PRESETS)
ALIASES: dict[str, str] = {"smoothquant": "int8_sq", "awq": "int4_awq", "gptq": "int4_gptq", "w4a8": "w4a8_awq"}
# The Linears of the decoder layers in transformers' naming (model.layers.3.self_attn.q_proj,
# model.layers.3.mlp.down_proj): embeddings and lm_head never match.
LAYER_LINEARS = "*.layers.*_proj"
# The LM head in transformers' naming (a top-level module of *ForCausalLM); quantized only on request.
LM_HEAD = "lm_head"
# `--algo none --kv-cache-dtype fp8`: weights stay as they are, only KV-cache scales are calibrated.
KV_ONLY = "none"


def resolve_algo(name: str) -> str:
    """User spelling -> canonical algorithm name, or an error listing the valid ones."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in PRESETS or key == KV_ONLY:
        return key
    aliases = ", ".join(f"{a} = {c}" for a, c in ALIASES.items())
    raise LlmxError(f"--algo {name!r} is not a quantization algorithm; choose one of {', '.join(ALGOS)} "
                    f"(aliases: {aliases}), or `none` with --kv-cache-dtype to quantize only the KV cache.")


def needs_calibration(algo: str, kv_cache_dtype: str | None) -> bool:
    kv = kv_cache_dtype is not None
    return kv or (algo != KV_ONLY and PRESETS[algo].needs_calibration)


# The group sizes llmx chooses from when the user gives none, largest first: a larger group stores fewer scales
# (128 is the common default of AWQ/GPTQ releases), a smaller one fits models whose widths 128 does not divide
# (SmolLM2's hidden size 576 = 64 x 9).
AUTO_GROUP_SIZES = (128, 64, 32)


def chooses_group_size(algo: str, group_size: int | None) -> bool:
    """True when `algo` takes a group size and the user gave none: quantize picks one for the model."""
    return group_size is None and algo != KV_ONLY and PRESETS[algo].grouped


def choose_group_size(in_features: dict[str, int]) -> int:
    """The largest of AUTO_GROUP_SIZES dividing the input features of every quantized Linear (name -> features)."""
    for size in AUTO_GROUP_SIZES:
        if all(features % size == 0 for features in in_features.values()):
            return size
    name, features = next((n, f) for n, f in in_features.items() if f % AUTO_GROUP_SIZES[-1])
    raise LlmxError(f"{name} has {features} input features, which no group size of "
                    f"{'/'.join(map(str, AUTO_GROUP_SIZES))} divides; pass --group-size with a divisor of every "
                    "quantized Linear's input features, or --exclude the module.")


def effective_group_size(algo: str, group_size: int | None) -> int | None:
    """The group size the checkpoint records: --group-size for int4 formats (None: to be chosen for the model by
    choose_group_size), 16 for NVFP4, else None."""
    if algo == KV_ONLY:
        return None
    preset = PRESETS[algo]
    if preset.fixed_group_size is not None:
        return preset.fixed_group_size
    if preset.grouped and group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0 or group_size % 2:
            raise LlmxError(f"--group-size {group_size!r} must be a positive even integer (typically 64 or 128).")
        if algo == "w4a8_awq" and group_size % 32:
            raise LlmxError(f"--group-size {group_size} does not suit w4a8_awq, whose FP8 GEMM needs a multiple "
                            "of 32 (typically 128).")
        return group_size
    return None


def _weight_cfg(preset: Preset, group_size: int | None) -> Any:
    if preset.weight == "int4":
        return _int4_weight(group_size)
    if preset.weight == "w4a8":
        # ModelOpt's W4A8 AWQ: int4 groups, then an FP8 per-tensor stage over the group-scaled weight.
        return [_int4_weight(group_size), {"num_bits": FP8, "axis": None}]
    return copy.deepcopy(preset.weight)


def modelopt_config(algo: str, *, group_size: int | None, kv_cache_dtype: str | None,
                    disabled_modules: list[str], quantize_lm_head: bool = False) -> dict[str, Any]:
    """The `mtq.quantize` config for `algo`; `disabled_modules` are HF module names left unquantized.

    quantize_lm_head: the LM head's quantizers get exactly the decoder Linears' settings.
    """
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    if algo != KV_ONLY:
        preset = PRESETS[algo]
        modules = [LAYER_LINEARS] + ([LM_HEAD] if quantize_lm_head else [])
        for module in modules:
            entries.append({"quantizer_name": f"{module}.weight_quantizer", "cfg": _weight_cfg(preset, group_size)})
            if preset.input is not None:
                entries.append({"quantizer_name": f"{module}.input_quantizer", "cfg": copy.deepcopy(preset.input)})
        algorithm = copy.deepcopy(preset.algorithm)
    else:
        algorithm = "max"
    for module in disabled_modules:
        entries.append({"quantizer_name": f"{module}.*", "enable": False})
    if kv_cache_dtype is not None:
        num_bits = FP8 if kv_cache_dtype == "fp8" else 8
        entries.append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": num_bits, "axis": None}})
    return {"quant_cfg": entries, "algorithm": algorithm}

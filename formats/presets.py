"""The quantization algorithms llmx offers: one table, PRESETS, with one row (Preset) per algorithm.

A row holds every fact about its algorithm that the rest of llmx reads: the QuantMethod storing its weights
(llmx.formats.weights.registry instantiates it for checkpoints of the algorithm), the ModelOpt `mtq.quantize`
config (quantizer settings for the Linear weights and inputs plus the calibration algorithm), the Triton GEMM
its Linears run on CUDA (build's tile tuning), whether it needs FP8 hardware (recipe and build target checks),
whether it keeps smoothing vectors and shares per-tensor scales across fused Linears (the llmx export), its
group-size rule, whether it needs calibration data, its ModelOpt HF name (export and import) and its aliases
on the command line. Adding an algorithm is one row here, plus its QuantMethod file and kernel when its weight
format is new (tests/quant/test_algorithm_table.py shows every consumer reading a new row).

ModelOpt configs Configs use ModelOpt 0.47's list form ({"quantizer_name": pattern, "cfg" |
"enable": ...}, later entries win). Only Linears of the decoder layers are quantized, plus the LM head
when asked (`llmx quantize --quantize-lm-head`): everything is disabled first, then the weight/input
quantizers of the decoder layers' Linears (and of the head, with the same settings) are switched on,
then every excluded module is switched off by exact name, so llmx never depends on ModelOpt's own
default exclusions (llmx.quant.api checks afterwards that exactly the planned Linears were quantized).

Plain data, no ModelOpt or torch import: `llmx --help` and recipe validation read it. The table is read at use
time (no consumer copies it at import).
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
    # The QuantMethod storing the weights, "module:Class" (llmx.formats.weights.registry imports it when a
    # checkpoint of this algorithm is read; algorithms storing the same format name the same class).
    method: str
    # ModelOpt weight quantizer cfg: a dict, or a function of the group size for grouped formats.
    weight: Any
    input: dict[str, Any] | None  # input quantizer cfg; None = activations not quantized
    algorithm: Any  # ModelOpt calibration algorithm ("max", {"method": ...})
    needs_calibration: bool  # activation statistics or data-driven weights (AWQ, GPTQ, SmoothQuant)
    # The Triton GEMM (llmx.kernels.tuning's kernel name) its Linears run on CUDA, whose tiles `llmx build`
    # tunes; None: cuBLAS (nothing to tune).
    kernel: str | None = None
    needs_fp8: bool = False  # weights, activations or scales in e4m3: FP8 hardware (compute capability 8.9+)
    # AWQ/SmoothQuant vectors: folded into the norms in front of q/k/v and gate/up, kept as pre_quant_scale on
    # o_proj and down_proj (llmx.quant.export_llmx).
    smoothing: bool = False
    # One weight scale per tensor (or a global one): Linears fused at build share it (llmx.quant.export_llmx).
    per_tensor_weight_scale: bool = False
    grouped: bool = False  # weights in groups of --group-size along the input features
    group_multiple: int = 2  # --group-size must be a multiple of this ...
    group_multiple_reason: str = ""  # ... for this reason (beyond the int4 packing's 2)
    fixed_group_size: int | None = None  # NVFP4's 16-element blocks
    calib_use_cache: bool = True  # layerwise GPTQ replays layers and needs forwards without a KV cache
    hf_quant_algo: str | None = None  # ModelOpt's quant_algo in an HF folder of this format (export and import)
    hf_int4_row_pairs: bool = False  # that folder packs int4 weights two output rows per byte (repacked on import)
    aliases: tuple[str, ...] = ()  # other spellings --algo and recipes accept
    notes: tuple[str, ...] = field(default=())

    @property
    def layerwise(self) -> bool:
        """Whether ModelOpt calibrates layer by layer (GPTQ): modules outside the decoder layers are not visited."""
        return isinstance(self.algorithm, dict) and bool(self.algorithm.get("layerwise", {}).get("enable"))


def _int4_weight(group_size: int) -> dict[str, Any]:
    return {"num_bits": 4, "block_sizes": {-1: group_size, "type": "static"}}


def _w4a8_weight(group_size: int) -> list[dict[str, Any]]:
    """ModelOpt's W4A8 AWQ: int4 groups, then an FP8 per-tensor stage over the group-scaled weight."""
    return [_int4_weight(group_size), {"num_bits": FP8, "axis": None}]


_FP8_METHODS = "llmx.formats.weights.fp8"
_INT8_METHODS = "llmx.formats.weights.int8"
_INT4_METHOD = "llmx.formats.weights.int4:Int4Method"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fp8", "FP8 e4m3 weights and activations, per-tensor static scales",
               method=f"{_FP8_METHODS}:Fp8Method",
               weight={"num_bits": FP8, "axis": None}, input={"num_bits": FP8, "axis": None},
               algorithm="max", needs_calibration=True, needs_fp8=True, per_tensor_weight_scale=True,
               hf_quant_algo="FP8"),
        Preset("fp8_pc_pt", "FP8 weights per output channel, activations per token at run time",
               method=f"{_FP8_METHODS}:Fp8PerChannelMethod",
               weight={"num_bits": FP8, "axis": 0}, input=None, algorithm="max", needs_calibration=False,
               needs_fp8=True, hf_quant_algo="FP8_PER_CHANNEL_PER_TOKEN"),
        Preset("int8_sq", "SmoothQuant W8A8: int8 per-channel weights, int8 per-token activations",
               method=f"{_INT8_METHODS}:Int8SmoothQuantMethod",
               weight={"num_bits": 8, "axis": 0}, input={"num_bits": 8, "axis": None},
               algorithm={"method": "smoothquant", "alpha": 0.5}, needs_calibration=True, kernel="int8",
               smoothing=True, hf_quant_algo="W8A8_SQ_PER_CHANNEL", aliases=("smoothquant",)),
        Preset("int8_wo", "int8 per-channel weights, 16-bit activations (round to nearest)",
               method=f"{_INT8_METHODS}:Int8WeightOnlyMethod",
               weight={"num_bits": 8, "axis": 0}, input=None, algorithm="max", needs_calibration=False,
               kernel="int8_wo", hf_quant_algo="W8A16"),
        Preset("int4_wo", "int4 group-wise weights, 16-bit activations (round to nearest)",
               method=_INT4_METHOD, weight=_int4_weight, input=None, algorithm="max", needs_calibration=False,
               kernel="w4a16", grouped=True),
        Preset("int4_awq", "int4 group-wise weights chosen by AWQ (activation-aware scaling)",
               method=_INT4_METHOD, weight=_int4_weight, input=None,
               algorithm={"method": "awq_lite", "alpha_step": 0.1}, needs_calibration=True, kernel="w4a16",
               smoothing=True, grouped=True, hf_quant_algo="W4A16_AWQ", hf_int4_row_pairs=True, aliases=("awq",)),
        Preset("int4_gptq", "int4 group-wise weights chosen by GPTQ (Hessian-based error compensation)",
               method=_INT4_METHOD, weight=_int4_weight, input=None,
               algorithm={"method": "gptq", "layerwise": {"enable": True}},
               needs_calibration=True, kernel="w4a16", grouped=True, calib_use_cache=False, aliases=("gptq",)),
        Preset("w4a8_awq", "int4 group-wise AWQ weights with FP8 activations",
               method="llmx.formats.weights.w4a8:W4A8Method", weight=_w4a8_weight, input={"num_bits": FP8, "axis": None},
               algorithm={"method": "awq_lite", "alpha_step": 0.1}, needs_calibration=True, kernel="w4a8",
               needs_fp8=True, smoothing=True, grouped=True, group_multiple=32, group_multiple_reason="FP8 GEMM",
               hf_quant_algo="W4A8_AWQ", hf_int4_row_pairs=True, aliases=("w4a8",)),
        Preset("nvfp4", "NVFP4: e2m1 weights in blocks of 16 with e4m3 block scales and a global scale",
               method="llmx.formats.weights.nvfp4:Nvfp4Method",
               weight={"num_bits": FP4, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": FP8}},
               input={"num_bits": FP4, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": FP8}},
               algorithm="max", needs_calibration=True, kernel="nvfp4", needs_fp8=True,
               per_tensor_weight_scale=True, fixed_group_size=16, hf_quant_algo="NVFP4"),
    )
}
# The Linears of the decoder layers in transformers' naming (model.layers.3.self_attn.q_proj,
# model.layers.3.mlp.down_proj): embeddings and lm_head never match.
LAYER_LINEARS = "*.layers.*_proj"
# The LM head in transformers' naming (a top-level module of *ForCausalLM); quantized only on request.
LM_HEAD = "lm_head"
# `--algo none --kv-cache-dtype fp8`: weights stay as they are, only KV-cache scales are calibrated.
KV_ONLY = "none"


def aliases() -> dict[str, str]:
    """Alias -> canonical algorithm name, from the rows' `aliases`."""
    return {alias: p.name for p in PRESETS.values() for alias in p.aliases}


def resolve_algo(name: str) -> str:
    """User spelling -> canonical algorithm name, or an error listing the valid ones."""
    key = name.strip().lower().replace("-", "_")
    known = aliases()
    key = known.get(key, key)
    if key in PRESETS or key == KV_ONLY:
        return key
    spellings = ", ".join(f"{a} = {c}" for a, c in known.items())
    raise LlmxError(f"--algo {name!r} is not a quantization algorithm; choose one of {', '.join(PRESETS)} "
                    f"(aliases: {spellings}), or `none` with --kv-cache-dtype to quantize only the KV cache.")


def preset_of(algo: str) -> Preset | None:
    """The row of a canonical algorithm name; None for `none` (KV cache only) and names outside the table."""
    return PRESETS.get(algo)


def fp8_algos() -> tuple[str, ...]:
    """The algorithms needing FP8 hardware, in table order."""
    return tuple(name for name, p in PRESETS.items() if p.needs_fp8)


def algos_without_fp8() -> tuple[str, ...]:
    """The algorithms that run on GPUs without FP8 support, in table order."""
    return tuple(name for name, p in PRESETS.items() if not p.needs_fp8)


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
        if group_size % preset.group_multiple:
            raise LlmxError(f"--group-size {group_size} does not suit {algo}, whose {preset.group_multiple_reason} "
                            f"needs a multiple of {preset.group_multiple} (typically 128).")
        return group_size
    return None


def _weight_cfg(preset: Preset, group_size: int | None) -> Any:
    return preset.weight(group_size) if callable(preset.weight) else copy.deepcopy(preset.weight)


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

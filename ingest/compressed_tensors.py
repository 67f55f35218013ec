"""compressed-tensors checkpoints (llm-compressor's releases, `quant_method: compressed-tensors` in config.json):
which of their schemes map onto an llmx format, read into an llmx QuantConfig.

Imported (the tensors keep their values; llmx.ingest.hf_import reads them):
- FP8 `float-quantized`, static per-tensor weights and activations (llm-compressor's FP8 scheme) -> fp8.
  Each of q/k/v and gate/up keeps its own weight and input scale; `llmx build` requantizes each fused group
  to its largest scale, as for any fp8 checkpoint.
- FP8 `float-quantized`, per-channel (or per-tensor) weights and dynamic per-token activations (FP8_DYNAMIC)
  -> fp8_pc_pt; a per-tensor weight scale is repeated over the output channels.
- int4 `pack-quantized`, symmetric, group-wise, weight-only (llm-compressor's W4A16, GPTQ without group
  act-order) -> int4_wo: `weight_packed` int32 [N, K/8] holds inputs 8j..8j+7 from the low nibble up, each
  plus 8, so its little-endian bytes are llmx's uint8 [N, K/2] (input 2j low, value + 8) as they are;
  `weight_scale` [N, K/group] is cast to the activation dtype.
- int8 `int-quantized`, symmetric static per-channel (or per-tensor) weights and dynamic per-token activations
  (llm-compressor's W8A8, SmoothQuant already folded into the norms) -> int8_sq. Its activation scales are
  absmax / 127.5 over [-128, 127], llmx's absmax / 127 over [-127, 127]: the weights are the producer's,
  the activations round on a 0.4% different grid.
- An FP8 KV-cache scheme (per-tensor, static) -> kv_cache_dtype fp8, with the `self_attn.k_scale` /
  `v_scale` tensors.
- `ignore`: module names, and `re:` patterns matched against the model's Linears as compressed-tensors does.
Every other scheme (asymmetric or act-ordered int4, static int8 activations, NVFP4, block FP8, several config
groups) is refused in one sentence naming the field, rather than read wrongly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmx.common.errors import LlmxError
from llmx.formats.config import QuantConfig
from llmx.formats.families import llmx_to_hf_name

if TYPE_CHECKING:
    from llmx.formats.config import ModelConfig, QuantConfig

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

QUANT_METHOD = "compressed-tensors"
FLOAT_FORMAT = "float-quantized"
INT_FORMAT = "int-quantized"
PACK_FORMAT = "pack-quantized"


def is_compressed_tensors(quantization_config: Any) -> bool:
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == QUANT_METHOD


def read_quant_config(config_path: Path, q: dict, model: "ModelConfig") -> "QuantConfig":
    """The llmx QuantConfig of config.json's compressed-tensors `quantization_config` `q`."""
    where = f"{config_path}: quantization_config"
    status = q.get("quantization_status")
    if status != "compressed":
        raise LlmxError(f"{where}.quantization_status is {status!r}; llmx imports saved (compressed) checkpoints "
                        "only: save the model with llm-compressor's save_pretrained.")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise LlmxError(f"{where}.config_groups holds {len(groups)} schemes; llmx imports checkpoints with one "
                        "scheme for every Linear: quantize the unquantized model with `llmx quantize`.")
    name, group = next(iter(groups.items()))
    field = f"{where}.config_groups.{name}"
    if group.get("targets") != ["Linear"]:
        raise LlmxError(f"{field}.targets is {group.get('targets')!r}; llmx imports schemes targeting every "
                        "Linear ([\"Linear\"]).")
    fmt = group.get("format") or q.get("format")
    if group.get("output_activations"):
        raise LlmxError(f"{field}.output_activations is set; llmx quantizes no Linear outputs.")
    if fmt == FLOAT_FORMAT:
        algo, group_size = _fp8_algo(group.get("weights"), group.get("input_activations"), field), None
    elif fmt == INT_FORMAT:
        algo, group_size = _int8_algo(group.get("weights"), group.get("input_activations"), field), None
    elif fmt == PACK_FORMAT:
        algo, group_size = _int4_algo(group.get("weights"), group.get("input_activations"), field)
    else:
        raise LlmxError(f"{field}: format {fmt!r} is not imported by llmx (it reads {FLOAT_FORMAT} FP8, "
                        f"{INT_FORMAT} int8 and {PACK_FORMAT} int4 checkpoints); quantize the unquantized model "
                        "with `llmx quantize`.")
    return QuantConfig(algo=algo, group_size=group_size,
                       kv_cache_dtype=_kv_cache_dtype(q.get("kv_cache_scheme"), where),
                       exclude=_exclude(q.get("ignore") or [], model, where))


def _int8_algo(weights: Any, acts: Any, field: str) -> str:
    """int8_sq for static symmetric int8 weights with dynamic per-token int8 activations (W8A8)."""
    if not _is_int(weights, 8) or weights.get("dynamic") or weights.get("strategy") not in ("tensor", "channel"):
        raise LlmxError(f"{field}.weights {_describe(weights)} is not an int8 format llmx imports (static, "
                        "symmetric, per tensor or per channel).")
    if _is_int(acts, 8) and acts.get("strategy") == "token" and acts.get("dynamic") is True:
        return "int8_sq"
    raise LlmxError(f"{field}: int8 weights with input_activations {_describe(acts)} match no llmx format "
                    "(int8_sq quantizes activations per token at run time).")


def _is_int(args: Any, bits: int) -> bool:
    return isinstance(args, dict) and args.get("type") == "int" and args.get("num_bits") == bits and \
        args.get("symmetric", True) is True and not args.get("group_size")


def _int4_algo(weights: Any, acts: Any, field: str) -> tuple[str, int]:
    """int4_wo and its group size, for symmetric group-wise 4-bit weights without group act-order."""
    ok = isinstance(weights, dict) and weights.get("type") == "int" and weights.get("num_bits") == 4 and \
        weights.get("strategy") == "group" and isinstance(weights.get("group_size"), int) and \
        weights["group_size"] > 0 and not weights.get("dynamic")
    if not ok:
        raise LlmxError(f"{field}.weights {_describe(weights)} is not an int4 format llmx imports (4-bit, "
                        "group-wise, static).")
    if weights.get("symmetric") is False:
        raise LlmxError(f"{field}.weights are asymmetric (zero points); llmx's int4 kernels are symmetric: "
                        "quantize the unquantized model with `llmx quantize --algo int4_awq`.")
    if weights.get("actorder") == "group":
        raise LlmxError(f"{field}.weights.actorder is 'group' (a g_idx permutation per input); llmx's int4 "
                        "groups are contiguous: quantize the unquantized model with `llmx quantize --algo int4_gptq`.")
    if acts is not None:
        raise LlmxError(f"{field}: int4 weights with input_activations {_describe(acts)} match no llmx format "
                        "(int4 is weight-only).")
    return "int4_wo", weights["group_size"]


def _fp8_algo(weights: Any, acts: Any, field: str) -> str:
    if not _is_fp8(weights) or weights.get("dynamic") or weights.get("strategy") not in ("tensor", "channel"):
        raise LlmxError(f"{field}.weights {_describe(weights)} is not a weight format llmx imports (static FP8 "
                        "per tensor or per channel).")
    if acts is None:
        raise LlmxError(f"{field}: weight-only FP8 (no input_activations) is not a format llmx runs; quantize "
                        "the unquantized model with `llmx quantize --algo fp8_pc_pt`.")
    if _is_fp8(acts) and acts.get("strategy") == "token" and acts.get("dynamic") is True:
        return "fp8_pc_pt"
    if _is_fp8(acts) and acts.get("strategy") == "tensor" and not acts.get("dynamic") and \
            weights.get("strategy") == "tensor":
        return "fp8"
    raise LlmxError(f"{field}: weights {_describe(weights)} with input_activations {_describe(acts)} match no llmx "
                    "format (fp8: static per-tensor weights and activations; fp8_pc_pt: dynamic per-token "
                    "activations).")


def _is_fp8(args: Any) -> bool:
    return isinstance(args, dict) and args.get("type") == "float" and args.get("num_bits") == 8 and \
        args.get("symmetric", True) is True and not args.get("group_size") and not args.get("block_structure")


def _describe(args: Any) -> str:
    if not isinstance(args, dict):
        return repr(args)
    keys = ("type", "num_bits", "strategy", "dynamic", "symmetric", "group_size", "block_structure")
    return "{" + ", ".join(f"{k}: {args.get(k)!r}" for k in keys if args.get(k) is not None) + "}"


def _kv_cache_dtype(scheme: Any, where: str) -> str | None:
    if scheme is None:
        return None
    if _is_fp8(scheme) and scheme.get("strategy", "tensor") == "tensor" and not scheme.get("dynamic"):
        return "fp8"
    raise LlmxError(f"{where}.kv_cache_scheme {_describe(scheme)} is not a KV-cache format llmx imports (static "
                    "per-tensor FP8).")


def _exclude(ignore: list, model: "ModelConfig", where: str) -> tuple[str, ...]:
    """`ignore` entries -> llmx module names: plain names as written, `re:` patterns matched (re.match, as
    compressed-tensors does) against the HF names of the model's Linears."""
    from llmx.formats.checkpoint import linear_modules

    hf_names = {llmx_to_hf_name(f"{m.name}.weight").removesuffix(".weight"): m.name for m in linear_modules(model)}
    hf_names.setdefault("lm_head", "lm_head")
    out: list[str] = []
    for entry in ignore:
        if not isinstance(entry, str):
            raise LlmxError(f"{where}.ignore holds {entry!r}; entries are module names or `re:` patterns.")
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as exc:
                raise LlmxError(f"{where}.ignore entry {entry!r} is not a valid regular expression ({exc}).") from None
            out += [llmx for hf, llmx in hf_names.items() if pattern.match(hf)]
        elif entry in hf_names:
            out.append(hf_names[entry])
    return tuple(dict.fromkeys(out))

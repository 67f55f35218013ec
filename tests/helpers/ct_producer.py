"""compressed-tensors checkpoints made by compressed-tensors itself, on CPU, from a tiny HF model.

What llm-compressor does around compressed-tensors, in its smallest form: apply a preset scheme (FP8,
FP8_DYNAMIC, W4A16, ...) to the model's Linears, set the scales from min/max observations (weights; inputs over a
calibration batch for static activations; keys and values for a KV-cache scheme), compress the model with
`ModelCompressor` and save it with the `quantization_config` it writes. The compressed model stays in memory:
its forward decompresses it and runs compressed-tensors' own quantize-dequantize, the reference llmx's
imported engine is compared with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def produce(hf_dir: Path, out: Path, scheme: str, calib_ids: torch.Tensor, *, ignore: list[str] | None = None,
            scheme_overrides: dict[str, Any] | None = None):
    """Quantize the model at `hf_dir` with the compressed-tensors preset `scheme`; save it to `out`; return the
    in-memory compressed model (bfloat16)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config, disable_quantization,
                                                 enable_quantization, preset_name_to_scheme)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    preset = preset_name_to_scheme(scheme, ["Linear"])
    if scheme_overrides:
        preset = QuantizationScheme(**{**preset.model_dump(), **scheme_overrides})
    config = QuantizationConfig(config_groups={"group_0": preset}, ignore=["lm_head"] if ignore is None else ignore,
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)

    input_amax = _input_amax(model, calib_ids, disable_quantization)
    model.apply(enable_quantization)
    for name, module in model.named_modules():
        scheme_of = getattr(module, "quantization_scheme", None)
        if scheme_of is None:
            continue
        weight = module.weight.float()
        if scheme_of.weights.strategy == "channel":
            _set_qparams(module, "weight", weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True),
                         scheme_of.weights)
        elif scheme_of.weights.strategy == "group":
            groups = weight.reshape(weight.shape[0], -1, scheme_of.weights.group_size)
            _set_qparams(module, "weight", groups.amin(dim=2), groups.amax(dim=2), scheme_of.weights)
        else:
            _set_qparams(module, "weight", weight.amin().reshape(1), weight.amax().reshape(1), scheme_of.weights)
        acts = scheme_of.input_activations
        if acts is not None and not acts.dynamic:
            amax = torch.tensor([input_amax[name]])
            _set_qparams(module, "input", -amax, amax, acts)

    compressor = ModelCompressor.from_pretrained_model(model)  # the format compressed-tensors picks for the scheme
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (hf_dir / name).is_file() and not (out / name).is_file():
            (out / name).write_bytes((hf_dir / name).read_bytes())
    return model


def _input_amax(model, calib_ids: torch.Tensor, disable_quantization) -> dict[str, float]:
    """max |input| of every quantized Linear over the calibration batch, in the unquantized model."""
    amax: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None:
            def record(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())
            hooks.append(module.register_forward_pre_hook(record))
    model.apply(disable_quantization)
    with torch.no_grad():
        model(calib_ids)
    for hook in hooks:
        hook.remove()
    return amax


def _set_qparams(module, base: str, lo: torch.Tensor, hi: torch.Tensor, args) -> None:
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(lo, hi, args)
    for suffix, value in (("scale", scale), ("zero_point", zero_point)):
        param = getattr(module, f"{base}_{suffix}")
        param.data = value.to(param.dtype).reshape(param.shape)

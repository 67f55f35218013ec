"""Calibrated Linears -> the tensors of a quantized llmx checkpoint.

Input: for each quantized Linear (llmx module name) a `LinearState` read from the ModelOpt-quantized model
(llmx.quant.modelopt), the source checkpoint's tensors, and per-layer KV amax. Output: every checkpoint
tensor, in the order `checkpoint_tensor_specs` declares them, packed by the format's QuantMethod.

Smoothing (SmoothQuant) and AWQ pre-quant scales `s` replace y = x W^T by y = (x * s) (W / s)^T:
- q/k/v read the attention RMSNorm's output and gate/up the MLP RMSNorm's output. Their scale vectors
  are first made one vector (the mean, as ModelOpt's own export does; the weights are re-divided from the
  original float weights), which is then folded into the norm weight: exact, no runtime cost.
- o_proj and down_proj have no norm in front of them: they keep `pre_quant_scale` [K], multiplied onto x
  in apply. The checkpoint lists them in quantization.extra["pre_quant_scale_modules"].
- A quantized lm_head (`llmx quantize --quantize-lm-head`) reads the final RMSNorm's output alone: its
  vector is folded into final_norm the same way, as a group of one (HEAD_GROUP).
The folded norm weight is rounded to the checkpoint dtype, and the weights are divided by the scale that
rounding actually produced, so the folding stays exact up to float32 arithmetic.
Per-tensor scales of Linears fused at build (fp8 weight/input scales, the NVFP4 global scale) are made
one scale per group here, so build's fusion is a plain concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import torch

    from llmx.formats.config import ModelConfig, QuantConfig

from llmx.formats.checkpoint import FUSED_GROUPS, HEAD_GROUP, UNFUSED, checkpoint_tensor_specs, mlp_prefixes
from llmx.formats.presets import preset_of
from llmx.formats.weights import method_for
from llmx.formats.weights.kv_cache import kv_scale_from_amax, kv_scale_names


@dataclass
class LinearState:
    """What calibration decided for one Linear [N, K]; tensors are float32 on CPU.

    weight: the matrix the weight quantizer sees (for AWQ/SmoothQuant already divided by pre_quant_scale;
    for GPTQ the updated weight). weight_amax: the quantizer's amax (per tensor [], per channel [N, 1],
    per group [N*K/G, 1]) or None to derive it from `weight`. input_amax: calibrated activation amax
    (after pre_quant_scale). input_channel_amax: per-input-channel amax of x before smoothing [K], when
    ModelOpt kept it. pre_quant_scale: the smoothing vector [K] multiplied onto x, or None.
    """

    weight: "torch.Tensor"
    weight_amax: "torch.Tensor | None" = None
    input_amax: "torch.Tensor | None" = None
    input_channel_amax: "torch.Tensor | None" = None
    pre_quant_scale: "torch.Tensor | None" = None


def pre_quant_scale_patterns(algo: str) -> list[str]:
    """Modules that keep pre_quant_scale in checkpoints of `algo` (those without a norm to fold into), for the
    algorithms that smooth (their row's `smoothing` in llmx.formats.presets.PRESETS)."""
    preset = preset_of(algo)
    if preset is not None and preset.smoothing:
        return [f"layers.*.{block}.{proj}" for block, proj in UNFUSED]
    return []


def export_tensors(model: "ModelConfig", dtype: str, quant: "QuantConfig", *,
                   source: Callable[[str], "torch.Tensor"], states: dict[str, LinearState],
                   kv_amax: dict[int, tuple["torch.Tensor", "torch.Tensor"]],
                   progress: Callable[[str, int, int], None] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, tensor) for every checkpoint tensor in `checkpoint_tensor_specs` order.

    source(name) returns the unquantized checkpoint's tensor; `states` holds the quantized Linears
    (llmx module names), every other Linear is copied from the source.
    """
    specs = checkpoint_tensor_specs(model, dtype, quant)
    produced: dict[str, "torch.Tensor"] = {}
    done_layers: set[int] = set()
    head_names, head_norm = HEAD_GROUP
    head_done = not any(n in states for n in head_names)
    for name, spec in specs.items():
        if not head_done and name.split(".", 1)[0] in (head_norm, *head_names):
            produced.update(_export_fused(list(head_names), f"{head_norm}.weight", dtype, quant, source, states))
            head_done = True
        layer = _layer_of(name)
        if layer is not None and layer not in done_layers:
            produced.update(_export_layer(layer, model, dtype, quant, source, states))
            if quant.kv_cache_dtype is not None:
                k_name, v_name = kv_scale_names(layer)
                k_amax, v_amax = kv_amax[layer]
                produced[k_name] = kv_scale_from_amax(k_amax, quant.kv_cache_dtype)
                produced[v_name] = kv_scale_from_amax(v_amax, quant.kv_cache_dtype)
            done_layers.add(layer)
            if progress is not None:
                progress("export", len(done_layers), model.num_layers)
        tensor = produced.pop(name) if name in produced else _copy(source(name), spec.dtype)
        yield name, tensor


def _layer_of(name: str) -> int | None:
    if not name.startswith("layers."):
        return None
    return int(name.split(".", 2)[1])


def _copy(tensor: "torch.Tensor", dtype: str) -> "torch.Tensor":
    import torch

    return tensor.to(getattr(torch, dtype))


def _export_layer(layer: int, model: "ModelConfig", dtype: str, quant: "QuantConfig",
                  source: Callable[[str], "torch.Tensor"], states: dict[str, LinearState]) -> dict[str, "torch.Tensor"]:
    """The quantized Linears of one layer, and its norms when a smoothing vector was folded into them."""
    out: dict[str, "torch.Tensor"] = {}
    prefix = f"layers.{layer}"
    # A sparse layer's experts are MLPs of their own under layers.{i}.mlp.experts.{e} (formats/checkpoint.py).
    blocks = {"attn": [f"{prefix}.attn"], "mlp": mlp_prefixes(model, layer)}
    for block, projs, norm in FUSED_GROUPS:
        for module in blocks[block]:
            names = [f"{module}.{p}" for p in projs]
            out.update(_export_fused(names, f"{prefix}.{norm}.weight", dtype, quant, source, states,
                                     norm_offset=1.0 if model.family in ("gemma2", "gemma3") else 0.0))
    for block, proj in UNFUSED:
        for n in (f"{module}.{proj}" for module in blocks[block]):
            if n in states:
                out.update(_export_unfused(n, dtype, quant, source, states))
    return out


def _export_unfused(n: str, dtype: str, quant: "QuantConfig", source: Callable[[str], "torch.Tensor"],
                    states: dict[str, LinearState]) -> dict[str, "torch.Tensor"]:
    """A Linear without a norm in front (o_proj, down_proj): packed, keeping any pre_quant_scale."""
    s, method = states[n], method_for(quant, n)
    if getattr(method, "pre_quant_scale", False):
        import torch

        # Stored in the checkpoint dtype: divide the weight by exactly the vector apply will use.
        scale = s.pre_quant_scale if s.pre_quant_scale is not None else torch.ones(s.weight.shape[1])
        _rescale(s, source(f"{n}.weight"), scale.to(getattr(torch, dtype)).float())
    elif s.pre_quant_scale is not None:
        raise ValueError(f"{n}: calibration produced a pre_quant_scale that the {quant.algo} format cannot store")
    return _pack(n, s, method, dtype, keep_pre_quant_scale=True)


def _export_fused(names: list[str], norm_name: str, dtype: str, quant: "QuantConfig",
                  source: Callable[[str], "torch.Tensor"], states: dict[str, LinearState],
                  norm_offset: float = 0.0) -> dict[str, "torch.Tensor"]:
    """Linears `names` reading the output of norm `norm_name`: packed, with any smoothing folded into the norm
    (then the norm is among the tensors returned). Names not in `states` are left out (unquantized).
    norm_offset: 1 for Gemma's norms, which scale by (1 + weight)."""
    out: dict[str, "torch.Tensor"] = {}
    quantized = [n for n in names if n in states]
    if not quantized:
        return out
    group = [states[n] for n in quantized]
    if any(s.pre_quant_scale is not None for s in group):
        norm_weight, scale = _fold_into_norm(source(norm_name), group, dtype, norm_offset)
        out[norm_name] = norm_weight
        for n, s in zip(quantized, group):
            _rescale(s, source(f"{n}.weight"), scale)
    _share_per_tensor_amax(group, quant.algo)
    for n, s in zip(quantized, group):
        out.update(_pack(n, s, method_for(quant, n), dtype, keep_pre_quant_scale=False))
    return out


def _fold_into_norm(norm_weight: "torch.Tensor", group: list[LinearState], dtype: str, offset: float = 0.0):
    """One smoothing vector for the group, folded into the norm: (new norm weight, the scale it realizes).
    The norm multiplies by (offset + weight): Gemma stores w and scales by 1 + w."""
    import torch

    scales = [s.pre_quant_scale if s.pre_quant_scale is not None else torch.ones_like(s.weight[0])
              for s in group]
    mean = torch.stack([sc.float() for sc in scales]).mean(dim=0)
    norm = norm_weight.float() + offset
    folded = (norm * mean - offset).to(getattr(torch, dtype))
    realized = torch.where(norm != 0, (folded.float() + offset) / torch.where(norm != 0, norm, torch.ones_like(norm)),
                           mean)
    return folded, realized


def _rescale(state: LinearState, original_weight: "torch.Tensor", scale: "torch.Tensor") -> None:
    """Make `state` describe x*scale @ (W/scale)^T, from the original float weight W."""
    if state.input_channel_amax is not None:
        state.input_amax = (state.input_channel_amax.float() * scale).amax()
    state.weight = original_weight.float() / scale[None, :]
    state.weight_amax = None  # ModelOpt's amax belonged to the old scale: derive it from the new weight
    state.pre_quant_scale = scale


def _share_per_tensor_amax(group: list[LinearState], algo: str) -> None:
    """Fused Linears of per-tensor-scaled formats get one weight amax and one input amax (the max)."""
    import torch

    preset = preset_of(algo)
    if preset is not None and preset.per_tensor_weight_scale:
        amaxes = [s.weight.abs().amax() if s.weight_amax is None else s.weight_amax.float().reshape(())
                  for s in group]
        shared = torch.stack(amaxes).amax()
        for s in group:
            s.weight_amax = shared
    inputs = [s.input_amax for s in group]
    if all(a is not None for a in inputs) and len(group) > 1:
        shared_input = torch.stack([a.float().reshape(()) for a in inputs]).amax()
        for s in group:
            s.input_amax = shared_input


def _pack(name: str, state: LinearState, method, dtype: str, *, keep_pre_quant_scale: bool) -> dict[str, "torch.Tensor"]:
    pre_quant_scale = state.pre_quant_scale if keep_pre_quant_scale else None
    tensors = method.quantize_weight(state.weight, dtype, weight_amax=state.weight_amax,
                                     input_amax=state.input_amax, pre_quant_scale=pre_quant_scale)
    return {f"{name}.{suffix}": t for suffix, t in tensors.items()}

"""Quantizing mixtures of experts: llmx's per-expert Linears against transformers 5's 3-D expert tensors.

transformers 5 holds a sparse layer's experts as `mlp.experts.gate_up_proj` [experts, 2 * inter, hidden] (each
expert's gate rows then up rows) and `mlp.experts.down_proj` [experts, hidden, inter]; ModelOpt quantizes that
module with one weight quantizer per expert and projection (`gate_up_proj_weight_quantizers[e]`,
`down_proj_weight_quantizers[e]`) and one input quantizer per projection shared by every expert of the layer
(the one activation scale an inference kernel applies to the routed tokens). llmx stores one Linear per expert
(`layers.{i}.mlp.experts.{e}.gate_proj` ...), so this module maps between the two:

- `calibration_parameter`: where an llmx tensor goes in the transformers model ModelOpt calibrates;
- `expert_quantizer_entries`: the ModelOpt config entries that reach the expert quantizers;
- `read_expert_state`: one llmx expert Linear's LinearState from the calibrated module;
- `ExpertTokenCounts`: how many calibration tokens each expert was routed, per sparse layer. An expert that saw
  none still gets its weight scales: ModelOpt calibrates every expert's weight quantizers from the weights alone
  (its `iter_weights_for_calibration`), and its activation scale is the layer's shared one.

The router is never quantized (no Linear of llmx's plan; ModelOpt's pattern for Linears does not reach it).
Algorithms that smooth activations (AWQ, SmoothQuant) or run GPTQ are refused for experts: their per-expert
vectors have no norm of their own to fold into.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from llmx.common.errors import LlmxError
from llmx.formats.presets import KV_ONLY

if TYPE_CHECKING:
    import torch

    from llmx.formats.config import ModelConfig
    from llmx.quant.export_llmx import LinearState

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

# Weight formats whose expert Linears export without smoothing: per-tensor / per-channel scales or groups.
EXPERT_ALGOS = ("fp8", "fp8_pc_pt", "int8_wo", "int4_wo", "nvfp4")
_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj")
_ROUTER = re.compile(r"layers\.(\d+)\.mlp\.router\.weight")


def check_algo(model: "ModelConfig", algo: str, source: Any) -> None:
    if model.num_experts and algo not in (*EXPERT_ALGOS, KV_ONLY):
        raise LlmxError(f"{source}: --algo {algo} is not supported for the mixture of experts {model.architecture} "
                        f"yet; choose one of {', '.join(EXPERT_ALGOS)} (smoothing and GPTQ have no per-expert norm to "
                        "fold into).")


def expert_module(name: str) -> tuple[int, int, str] | None:
    """`layers.3.mlp.experts.5.up_proj` -> (3, 5, "up"); None for any other module name."""
    m = _EXPERT.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def calibration_parameter(name: str, model: "ModelConfig") -> tuple[str, tuple] | None:
    """The transformers 5 parameter (and index into it) holding llmx tensor `name`, for the tensors it holds
    differently from the hub's names: expert weights (3-D) and the router (`mlp.gate`, Mixtral's too)."""
    m = _ROUTER.fullmatch(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.gate.weight", ()
    found = expert_module(name.removesuffix(".weight")) if name.endswith(".weight") else None
    if found is None:
        return None
    layer, e, proj = found
    inter, prefix = model.moe_intermediate_size, f"model.layers.{layer}.mlp.experts"
    if proj == "down":
        return f"{prefix}.down_proj", (e,)
    return f"{prefix}.gate_up_proj", (e, slice(0, inter) if proj == "gate" else slice(inter, 2 * inter))


def expert_quantizer_entries(quant_cfg: list[dict]) -> list[dict]:
    """Entries giving the fused experts' quantizers the settings of the Linears' weight / input quantizers."""
    extra = []
    for entry in quant_cfg:
        pattern = entry.get("quantizer_name", "")
        if "cfg" not in entry or not pattern.endswith(("_proj.weight_quantizer", "_proj.input_quantizer")):
            continue
        if pattern.startswith("lm_head"):
            continue
        kind = "weight_quantizers*" if pattern.endswith("weight_quantizer") else "input_quantizer"
        extra.append({"quantizer_name": f"*.mlp.experts.*_proj_{kind}", "cfg": entry["cfg"]})
    return extra


def read_expert_state(model: Any, name: str, config: "ModelConfig") -> "LinearState":
    """The calibrated state of llmx expert Linear `name` (float32, CPU) from the quantized transformers model."""
    from llmx.quant.export_llmx import LinearState

    layer, e, proj = expert_module(name)
    experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    attr = "down_proj" if proj == "down" else "gate_up_proj"
    weight = getattr(experts, attr)[e].detach().float().cpu()
    weight_amax = _amax(getattr(experts, f"{attr}_weight_quantizers")[e])
    input_amax = _amax(getattr(experts, f"{attr}_input_quantizer"))
    if proj != "down":
        # gate rows then up rows; a per-channel or per-group amax lists them in the same row-major order.
        inter, half = config.moe_intermediate_size, slice(0, 1) if proj == "gate" else slice(1, 2)
        weight = weight[half.start * inter:half.stop * inter]
        if weight_amax is not None and weight_amax.numel() > 1:
            rows = weight_amax.shape[0] // 2
            weight_amax = weight_amax[half.start * rows:half.stop * rows]
    return LinearState(weight=weight, weight_amax=weight_amax, input_amax=input_amax)


def _amax(quantizer: Any) -> "torch.Tensor | None":
    """A ModelOpt TensorQuantizer's calibrated amax (float32, CPU), or None when disabled or uncalibrated."""
    import torch

    amax = getattr(quantizer, "amax", None) if getattr(quantizer, "is_enabled", False) else None
    return amax.detach().float().cpu() if isinstance(amax, torch.Tensor) else None


class ExpertTokenCounts:
    """Counts, per sparse layer, the calibration tokens routed to each expert (hooks on transformers' routers)."""

    def __init__(self, model: Any, config: "ModelConfig"):
        import torch

        self.counts = {i: torch.zeros(config.num_experts, dtype=torch.int64) for i in config.sparse_layers}
        self._hooks = [model.get_submodule(f"model.layers.{i}.mlp.gate").register_forward_hook(self._hook(i))
                       for i in config.sparse_layers]

    def _hook(self, layer: int):
        import torch

        def count(_module, _inputs, output):
            ids = output[2] if isinstance(output, tuple) else None  # (logits, weights, expert ids)
            if ids is not None:
                self.counts[layer] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.counts[layer].numel())

        return count

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def unseen(self) -> dict[int, int]:
        """Sparse layer -> how many of its experts calibration routed no token to."""
        return {layer: int((c == 0).sum()) for layer, c in self.counts.items()}


def coverage_warnings(unseen: dict[int, int], num_experts: int) -> list[str]:
    """One line per sparse layer where some expert saw no calibration token, saying how it was handled."""
    return [f"layer {layer}: {n} of {num_experts} experts saw no calibration tokens; their weight scales come from "
            "their weights alone and their activation scale is the layer's shared one (as ModelOpt calibrates "
            "experts); more --calib-size reaches more experts" for layer, n in unseen.items() if n]

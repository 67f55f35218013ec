"""Mixture-of-experts config.json fields (Mixtral, Qwen2-MoE, Qwen3-MoE) -> the ModelConfig fields only they use,
and the inverse for the config.json transformers loads.

Mixtral: every layer is sparse, `num_local_experts` experts of `intermediate_size`, top-k renormalised.
Qwen2-MoE / Qwen3-MoE: `num_experts` of `moe_intermediate_size`; layer i is sparse when it is not in
`mlp_only_layers` and (i + 1) is a multiple of `decoder_sparse_step` (transformers' rule), the other layers keep
the dense MLP of `intermediate_size`; `norm_topk_prob` says whether the top-k weights are renormalised. Qwen2-MoE
adds a shared expert of `shared_expert_intermediate_size` whose output is scaled by sigmoid(shared_expert_gate(x)).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.formats.config import ModelConfig
from llmx.formats.config_fields import positive_int

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# config.json's name for ModelConfig's expert count, per family as the hub spells it. transformers 5 maps
# `num_experts` to `num_local_experts` for Qwen3-MoE (and writes that), so either key is read.
EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}


def moe_fields(hf: dict[str, Any], family: str, num_layers: int, source: Path) -> dict[str, Any]:
    """ModelConfig keyword arguments of an MoE family's config.json (validated; errors name `source`)."""
    key = next((k for k in ("num_local_experts", "num_experts") if k in hf), EXPERTS_KEY[family])
    experts = positive_int(hf, key, source)
    top_k = positive_int(hf, "num_experts_per_tok", source)
    if top_k > experts:
        raise LlmxError(f"{source}: field `num_experts_per_tok` is {top_k} but the model has {experts} experts "
                        f"(`{key}`); top-k routing cannot pick more experts than exist, fix config.json.")
    if family == "mixtral":
        return {"num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
                "moe_intermediate_size": positive_int(hf, "intermediate_size", source),
                "sparse_layers": tuple(range(num_layers))}
    step = positive_int(hf, "decoder_sparse_step", source, default=1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise LlmxError(f"{source}: field `mlp_only_layers` must be a list of layer indices, got {dense!r:.80}.")
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    if not sparse:
        raise LlmxError(f"{source}: `decoder_sparse_step` {step} and `mlp_only_layers` leave no sparse layer among "
                        f"{num_layers}; load this model as its dense family instead, or fix config.json.")
    norm = hf.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise LlmxError(f"{source}: field `norm_topk_prob` must be true or false, got {norm!r}.")
    fields = {"num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": norm,
              "moe_intermediate_size": positive_int(hf, "moe_intermediate_size", source), "sparse_layers": sparse}
    if family == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = positive_int(hf, "shared_expert_intermediate_size", source)
    return fields


def moe_hf_fields(model: ModelConfig) -> dict[str, Any]:
    """The config.json fields transformers reads for `model`'s experts (the inverse of moe_fields)."""
    fields: dict[str, Any] = {EXPERTS_KEY[model.family]: model.num_experts,
                              "num_experts_per_tok": model.num_experts_per_tok,
                              "output_router_logits": False, "router_aux_loss_coef": 0.0}
    if model.family == "mixtral":
        return fields
    fields.update(moe_intermediate_size=model.moe_intermediate_size, norm_topk_prob=model.norm_topk_prob,
                  decoder_sparse_step=1,
                  mlp_only_layers=[i for i in range(model.num_layers) if not model.is_moe_layer(i)])
    if model.family == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = model.shared_expert_intermediate_size
    return fields

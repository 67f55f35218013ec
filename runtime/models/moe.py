"""The mixture-of-experts block of Mixtral, Qwen2-MoE and Qwen3-MoE, used by the decoder for sparse layers.

Per token x [hidden]:
  probs = softmax(router(x)) over the experts (float32); the top_k experts are kept, their weights renormalised to
  sum to 1 when `norm_topk_prob` (Mixtral always); y = sum over kept experts e of weight_e * down_e(silu(gate_e(x)) *
  up_e(x)); Qwen2-MoE adds sigmoid(shared_expert_gate(x)) * shared_expert(x).

Module names equal the engine's tensor names (`layers.3.mlp.router`, `layers.3.mlp.experts.5.gate_up_proj`), so
the loader fills them like any Linear. With tensor parallelism each expert holds a column slice of gate|up and
a row slice of down (formats/shard.py), so every rank routes the same way and the block's partial sums (experts and
shared expert alike) are all-reduced once, at its end. With expert parallelism (ParallelContext.ep_size = tp_size)
each rank holds a contiguous range of whole experts instead: the tokens are the same on every rank, so each rank
runs the routed (token, expert) pairs of its own experts, drops the others (expert id -1), and the same all-reduce
sums the ranks.

Unquantized experts are stacked after loading into [experts, 2 * inter, hidden] and [experts, hidden, inter] (each
expert's Linear keeps a view into them), which the fused kernel reads (ops.fused_moe: kernels/fused_moe.py on
CUDA, its torch reference elsewhere); fp8 experts likewise, with a weight scale per expert and the largest input
scale of the layer's experts per projection (quantize gives them one shared scale; ops.fused_moe_fp8). Experts of
the other formats run one expert at a time through their QuantMethod.
"""

from __future__ import annotations

import torch
from torch import nn

from llmx.formats.weights import method_for
from llmx.formats.weights.fp8 import Fp8Method
from llmx.formats.weights.unquantized import UnquantizedMethod
from llmx.formats.config import ModelConfig, QuantConfig
from llmx.runtime.distributed import ParallelContext, tp_all_reduce
from llmx.kernels import ops
from llmx.runtime.layers.linear import Linear


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, experts] -> (weights [T, top_k] float32, expert ids [T, top_k] int64), as transformers
    routes: softmax in float32, the top_k probabilities, divided by their sum when `renormalize`."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Expert(nn.Module):
    """One gated MLP of this rank's intermediate slice: down(silu(gate) * up), no all-reduce (the block does it)."""

    def __init__(self, hidden: int, inter: int, quant: QuantConfig | None, prefix: str, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * inter, bias=bias, method=method_for(quant, f"{prefix}.gate_proj"))
        self.down_proj = Linear(inter, hidden, bias=bias, method=method_for(quant, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class SparseMoE(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantConfig | None, ctx: ParallelContext, index: int):
        super().__init__()
        prefix = f"layers.{index}.mlp"
        tp = ctx.tp_size
        # Expert parallelism: whole experts, this rank's range [first_expert, first_expert + local experts).
        local = config.num_experts // ctx.ep_size
        self.first_expert = ctx.tp_rank * local if ctx.ep_size > 1 else 0
        hidden = config.hidden_size
        inter = config.moe_intermediate_size // (1 if ctx.ep_size > 1 else tp)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        # The router stays in the activation dtype whatever the experts' format (build never quantizes it).
        self.router = Linear(hidden, config.num_experts, bias=False, method=UnquantizedMethod())
        self.experts = nn.ModuleDict({str(e): Expert(hidden, inter, quant, f"{prefix}.experts.{e}")
                                      for e in range(self.first_expert, self.first_expert + local)})
        self.shared_expert = self.shared_expert_gate = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = Expert(hidden, config.shared_expert_intermediate_size // tp, quant,
                                        f"{prefix}.shared_expert")
            self.shared_expert_gate = Linear(hidden, 1, bias=False, method=UnquantizedMethod())
        self.w13: torch.Tensor | None = None  # [experts, 2 * inter, hidden]: stacked gate|up (unquantized or fp8)
        self.w2: torch.Tensor | None = None  # [experts, hidden, inter]: stacked down
        # fp8 experts: (gate|up weight scales [experts], its input scale [], down weight scales, its input scale).
        self.fp8_scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def weights_loaded(self) -> None:
        """Stack unquantized or fp8 experts for the fused path; each expert's Linear keeps views of its slices."""
        linears = [(e.gate_up_proj, e.down_proj) for e in self.experts.values()]
        methods = {type(lin.method) for pair in linears for lin in pair}
        if len(methods) != 1 or methods - {UnquantizedMethod, Fp8Method} or any(
                lin.has_bias for pair in linears for lin in pair):
            return
        self.w13 = torch.stack([gate_up.tensors["weight"] for gate_up, _ in linears])
        self.w2 = torch.stack([down.tensors["weight"] for _, down in linears])
        if methods == {Fp8Method}:
            def scales(i: int, name: str) -> torch.Tensor:
                return torch.stack([pair[i].tensors[name].float().reshape(()) for pair in linears])

            self.fp8_scales = (scales(0, "weight_scale"), scales(0, "input_scale").amax(),
                               scales(1, "weight_scale"), scales(1, "input_scale").amax())
        for e, (gate_up, down) in enumerate(linears):
            gate_up.tensors = {**gate_up.tensors, "weight": self.w13[e]}
            down.tensors = {**down.tensors, "weight": self.w2[e]}

    @property
    def capturable(self) -> bool:
        """Whether a CUDA graph can hold this block: the fused path; the one-by-one path syncs with the host."""
        return self.w13 is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (all-reduced over the tensor-parallel ranks)."""
        weights, ids = route(self.router(x), self.top_k, self.renormalize)
        if len(self.experts) < self.router.out_features:  # expert parallelism: this rank's experts, local ids
            ids = ids - self.first_expert
            ids = torch.where((ids >= 0) & (ids < len(self.experts)), ids, -1)
        if self.fp8_scales is not None:
            w13_scale, a13_scale, w2_scale, a2_scale = self.fp8_scales
            out = ops.fused_moe_fp8(x, self.w13, w13_scale, a13_scale, self.w2, w2_scale, a2_scale, weights, ids)
        elif self.w13 is not None:
            out = ops.fused_moe(x, self.w13, self.w2, weights, ids)
        else:
            out = self._experts_one_by_one(x, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return tp_all_reduce(out)

    def _experts_one_by_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Any expert format: each local expert that some token chose runs on its tokens; sums in float32."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(ids[ids >= 0]).tolist():
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            y = self.experts[str(self.first_expert + e)](x[token]).float() * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.to(x.dtype)

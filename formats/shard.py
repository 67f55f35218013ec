"""Tensor- and pipeline-parallel split rules: which slice of each checkpoint tensor a rank holds.

Rank r of a Mapping has tp_rank = r % tp and pp_rank = r // tp.

Tensor parallelism, per module (weights [out, in]):
- column-parallel (q/k/v, gate/up): the output features are split; biases follow them. Each expert of a
  mixture of experts (and the shared expert) is split like the dense MLP, over its own intermediate size; the
  router and the shared-expert gate are replicated. With expert parallelism (Mapping.ep = tp) each tp rank
  holds num_experts / ep whole experts instead (rank r the r-th contiguous range), unsliced.
- row-parallel (o_proj, down_proj): the input features are split. Their bias is stored whole on every
  rank; the runtime adds it once, after the all-reduce of the partial products.
- vocab-parallel (embed, lm_head): vocabulary rows are split into tp slices of ceil(vocab / tp) rows;
  the last slices are zero-padded when tp does not divide the vocabulary.
- norms (incl. Qwen3's q_norm/k_norm) and KV-cache scales are replicated.
- KV heads: each rank holds num_kv_heads / tp heads when tp divides them; when tp is a multiple of
  num_kv_heads, each rank holds one head, kv head h serving ranks h*tp/kv .. (h+1)*tp/kv - 1 (the query
  heads of a rank always fall in the group of that KV head); other combinations are refused.
Quantized tensors are sliced along the axes their QuantMethod's TensorSpec names (out_dim / in_dim, with
the features each element spans: packed int4, group scales); tensors with neither axis are replicated.

Pipeline parallelism: layers split into pp contiguous stages as evenly as possible, earlier stages
taking the remainder; the first stage holds the embedding, the last the final norm and lm_head (and the
embedding again when the head is tied to it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from llmx.common.errors import LlmxError
from llmx.formats.checkpoint import linear_modules
from llmx.formats.config import Mapping, ModelConfig, QuantConfig
from llmx.formats.weights import TensorSpec, method_for

if TYPE_CHECKING:
    import torch

# Parallel styles of modules, keyed by the module's last name component.
_STYLES = {
    "q_proj": "q",
    "k_proj": "kv",
    "v_proj": "kv",
    "gate_proj": "column",
    "up_proj": "column",
    "o_proj": "row",
    "down_proj": "row",
    "embed": "vocab",
    "lm_head": "vocab",
}


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Global indices of the layers pipeline stage `pp_rank` holds; earlier stages take the remainder."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def vocab_per_rank(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp)


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return num_kv_heads // tp if num_kv_heads % tp == 0 else 1


def kv_head_start(num_kv_heads: int, tp: int, tp_rank: int) -> int:
    """First global KV head held by `tp_rank` (split heads, or the one replicated head it serves)."""
    if num_kv_heads % tp == 0:
        return tp_rank * (num_kv_heads // tp)
    return tp_rank // (tp // num_kv_heads)


def expert_index(name: str) -> int | None:
    """The expert a tensor or module of a sparse layer belongs to (`layers.3.mlp.experts.5.up_proj` -> 5), or None."""
    parts = name.split(".")
    return int(parts[4]) if len(parts) > 4 and parts[2:4] == ["mlp", "experts"] and parts[4].isdigit() else None


def experts_per_rank(model: ModelConfig, ep: int) -> int:
    return model.num_experts // ep


def parallel_style(module: str) -> str | None:
    """"q", "kv", "column", "row", "vocab", or None (replicated) for an llmx module name."""
    return _STYLES.get(module.rsplit(".", 1)[-1])


def split_name(name: str) -> tuple[str, str]:
    """"layers.0.attn.q_proj.weight" -> ("layers.0.attn.q_proj", "weight")."""
    module, _, suffix = name.rpartition(".")
    return module, suffix


def rank_holds(name: str, model: ModelConfig, mapping: Mapping, rank: int) -> bool:
    """Whether pipeline stage of `rank` holds tensor `name` at all."""
    pp_rank = mapping.pp_rank(rank)
    first, last = pp_rank == 0, pp_rank == mapping.pp - 1
    if name.startswith("layers."):
        expert = expert_index(name)
        if mapping.ep > 1 and expert is not None:
            if expert // experts_per_rank(model, mapping.ep) != mapping.tp_rank(rank):
                return False
        return int(name.split(".", 2)[1]) in stage_layers(model.num_layers, mapping.pp, pp_rank)
    if name.startswith("embed."):
        return first or (last and model.tie_word_embeddings)
    return last  # final_norm, lm_head


def local_features(module: str, model: ModelConfig, tp: int, ep: int = 1) -> tuple[int, int]:
    """(out_features, in_features) of one rank's slice of Linear `module` (any tp rank: slices are equal).
    ep > 1: experts are held whole."""
    if ep > 1 and expert_index(module) is not None:
        tp = 1
    style = parallel_style(module)
    if style == "row":
        start, stop = _row_range(module, model, tp, 0)
        return model.hidden_size, stop - start
    if style is None:
        raise ValueError(f"{module} is not a Linear of the model")
    start, stop = _feature_range(style, model, tp, 0, module)
    return stop - start, model.hidden_size


def _feature_range(style: str, model: ModelConfig, tp: int, tp_rank: int, module: str = "") -> tuple[int, int]:
    """[start, stop) of the layer features (output, or input for "row") this tp rank holds."""
    if style == "q":
        size = model.q_size // tp
        return tp_rank * size, (tp_rank + 1) * size
    if style == "kv":
        start = kv_head_start(model.num_kv_heads, tp, tp_rank) * model.head_dim
        return start, start + kv_heads_per_rank(model.num_kv_heads, tp) * model.head_dim
    if style == "column":
        size = model.mlp_intermediate_size(module) // tp
        return tp_rank * size, (tp_rank + 1) * size
    if style == "vocab":
        size = vocab_per_rank(model.vocab_size, tp)
        return tp_rank * size, (tp_rank + 1) * size
    raise ValueError(f"no output feature range for style {style!r}")


def _sliced_axis(style: str | None, spec: TensorSpec) -> tuple[int, int] | None:
    if style is None:
        return None
    return spec.in_dim if style == "row" else spec.out_dim


def _row_range(module: str, model: ModelConfig, tp: int, tp_rank: int) -> tuple[int, int]:
    in_features = model.q_size if module.endswith("o_proj") else model.mlp_intermediate_size(module)
    size = in_features // tp
    return tp_rank * size, (tp_rank + 1) * size


def _element_range(name: str, spec: TensorSpec, model: ModelConfig, mapping: Mapping,
                   rank: int) -> tuple[int, int, int] | None:
    """(axis, first element, stop element) this rank takes of tensor `name`, or None when replicated."""
    module, _ = split_name(name)
    style = parallel_style(module)
    whole_expert = mapping.ep > 1 and expert_index(module) is not None
    axis_info = _sliced_axis(style, spec) if mapping.tp > 1 and not whole_expert else None
    if axis_info is None:
        return None
    axis, per_element = axis_info
    tp_rank = mapping.tp_rank(rank)
    if style == "row":
        start, stop = _row_range(module, model, mapping.tp, tp_rank)
    else:
        start, stop = _feature_range(style, model, mapping.tp, tp_rank, module)
    return axis, start // per_element, stop // per_element


def shard_spec(name: str, spec: TensorSpec, model: ModelConfig, mapping: Mapping, rank: int) -> TensorSpec:
    """The spec of rank `rank`'s slice of a checkpoint tensor (validate_mapping must have passed)."""
    rng = _element_range(name, spec, model, mapping, rank)
    if rng is None:
        return spec
    axis, start, stop = rng
    shape = list(spec.shape)
    shape[axis] = stop - start
    return replace(spec, shape=tuple(shape))


def shard_tensor(name: str, tensor: "torch.Tensor", spec: TensorSpec, model: ModelConfig, mapping: Mapping,
                 rank: int) -> "torch.Tensor":
    """Rank `rank`'s slice of checkpoint tensor `name` (whole tensor when replicated), contiguous.

    Vocabulary slices past the end of the vocabulary are zero-filled up to ceil(vocab / tp) rows.
    """
    import torch

    rng = _element_range(name, spec, model, mapping, rank)
    if rng is None:
        return tensor
    axis, start, stop = rng
    length = tensor.shape[axis]
    first = min(start, length)
    piece = tensor.narrow(axis, first, min(stop, length) - first)
    if piece.shape[axis] < stop - start:
        pad_shape = list(piece.shape)
        pad_shape[axis] = stop - start - piece.shape[axis]
        piece = torch.cat([piece, torch.zeros(pad_shape, dtype=piece.dtype)], dim=axis)
    return piece.contiguous()


def validate_mapping(model: ModelConfig, mapping: Mapping, quant: QuantConfig | None, act_dtype: str = "bfloat16") -> None:
    """Refuse a TP/PP layout the model cannot be split into, with the arithmetic in the message."""
    tp, pp = mapping.tp, mapping.pp
    for field, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LlmxError(f"--{field} must be a positive integer, got {v!r}.")
    if model.num_heads % tp:
        raise LlmxError(f"tp {tp} does not divide the {model.num_heads} attention heads "
                        f"({model.num_heads} / {tp} = {model.num_heads / tp:g}); choose a tp among "
                        f"{_valid_tps(model)}.")
    kv = model.num_kv_heads
    if kv % tp and tp % kv:
        raise LlmxError(f"tp {tp} neither divides the {kv} KV heads nor is a multiple of them, so KV heads can be "
                        f"neither split nor replicated evenly; choose a tp among {_valid_tps(model)}.")
    ep = mapping.ep
    if ep != 1 and not model.num_experts:
        raise LlmxError(f"expert parallelism (--expert-parallel) splits the experts of a mixture of experts over the "
                        f"tp ranks, and {model.architecture} has none; build without it.")
    if ep not in (1, tp):
        raise LlmxError(f"expert parallelism over {ep} ranks must span the {tp} tensor-parallel ranks (ep 1 or {tp}): "
                        "the experts are split over the ranks of the tensor-parallel group.")
    if ep > 1 and model.num_experts % ep:
        raise LlmxError(f"expert parallelism (--expert-parallel) over --tp {ep} ranks does not divide the "
                        f"{model.num_experts} experts ({model.num_experts} / {ep} = {model.num_experts / ep:g}); "
                        f"choose a --tp that divides {model.num_experts}, or build without --expert-parallel to split "
                        "each expert by tp instead.")
    sizes = {"intermediate_size": model.intermediate_size} if len(model.sparse_layers) < model.num_layers else {}
    sizes.update({"moe_intermediate_size": model.moe_intermediate_size} if model.sparse_layers and ep == 1 else {})
    sizes.update({"shared_expert_intermediate_size": model.shared_expert_intermediate_size}
                 if model.sparse_layers and model.shared_expert_intermediate_size else {})
    for field, size in sizes.items():
        if size % tp:
            raise LlmxError(f"tp {tp} does not divide {field} {size:,} ({size:,} / {tp} = {size / tp:,.2f}); "
                            "choose another tp.")
    if pp > model.num_layers:
        raise LlmxError(f"pp {pp} exceeds the model's {model.num_layers} layers; choose pp <= {model.num_layers}.")
    if tp == 1:
        return
    for m in linear_modules(model):
        if ep > 1 and expert_index(m.name) is not None:
            continue  # held whole
        style = parallel_style(m.name)
        specs = method_for(quant, m.name).weight_specs(m.out_features, m.in_features, act_dtype)
        for suffix, spec in specs.items():
            axis_info = _sliced_axis(style, spec)
            if axis_info is None or axis_info[1] == 1:
                continue
            per_element = axis_info[1]
            if style == "row":
                start, stop = _row_range(m.name, model, tp, 0)
                total, kind = m.in_features, "row-parallel shard"
                what = f"{total:,} / {tp} = {stop - start:,} input features"
            else:
                start, stop = _feature_range(style, model, tp, 0, m.name)
                total, kind = m.out_features, "column-parallel shard"
                what = f"{stop - start:,} of the {total:,} output features"
            if (stop - start) % per_element:
                packing = (f"group size {per_element}" if quant is not None and quant.group_size == per_element
                           else f"the {per_element}-features-per-element packing of `{suffix}`")
                raise LlmxError(f"{packing} does not divide the {kind} of {what} of {m.name}; choose a tp that "
                                f"keeps each shard a multiple of {per_element}, or exclude {m.name} from "
                                "quantization.")


def _valid_tps(model: ModelConfig) -> str:
    """The tp sizes the head counts allow (before quantization packing and intermediate_size checks)."""
    kv = model.num_kv_heads
    ok = [t for t in range(1, model.num_heads + 1)
          if model.num_heads % t == 0 and (kv % t == 0 or t % kv == 0)]
    return ", ".join(map(str, ok))


def layout_summary(model: ModelConfig, mapping: Mapping) -> dict[str, Any]:
    """Per-rank sizes recorded in engine.json for the runtime and for humans."""
    return {
        "vocab_per_rank": vocab_per_rank(model.vocab_size, mapping.tp),
        "padded_vocab_size": vocab_per_rank(model.vocab_size, mapping.tp) * mapping.tp,
        "heads_per_rank": model.num_heads // mapping.tp,
        "kv_heads_per_rank": kv_heads_per_rank(model.num_kv_heads, mapping.tp),
        "kv_heads_replicated": model.num_kv_heads % mapping.tp != 0,
        "intermediate_per_rank": model.intermediate_size // mapping.tp,
        **({"moe_intermediate_per_rank": model.moe_intermediate_size // (mapping.tp // mapping.ep),
            "experts_per_rank": experts_per_rank(model, mapping.ep)} if model.sparse_layers else {}),
        "stage_layers": [[r.start, r.stop] for r in
                         (stage_layers(model.num_layers, mapping.pp, p) for p in range(mapping.pp))],
    }

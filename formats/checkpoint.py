"""The llmx checkpoint format: `llmx.json` + `rank{r}.safetensors` + tokenizer files (docs/ARCHITECTURE.md).

This module reads and writes the metadata, lists the tensors a checkpoint must hold for a given model
config and quantization (`checkpoint_tensor_specs`), and checks a rank file against that list without
loading any tensor data (`verify_tensors`).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping as MappingType

import llmx
from llmx.common.errors import LlmxError
from llmx.common.jsonio import dumps
from llmx.common.limits import SETTING_LIMITS, check_number
from llmx.formats.config import SUPPORTED_DTYPES, Mapping, ModelConfig, QuantConfig, model_config_problem
from llmx.formats.families import SUPPORTED_ARCHITECTURES
from llmx.formats.gemma_config import GEMMA_FAMILIES
from llmx.formats.safetensors_stream import SafetensorsFile
from llmx.formats.weights import TensorSpec, method_for

CHECKPOINT_FILE = "llmx.json"
CHECKPOINT_FORMAT = "llmx-checkpoint"
SCHEMA_VERSION = 1
# KV-cache quantization scales per layer (ARCHITECTURE.md): float32 scalars.
KV_SCALE_SUFFIXES = ("k_scale", "v_scale")
# Linears reading the same normalized input, fused at build, and the norm in front of them.
FUSED_GROUPS = (("attn", ("q_proj", "k_proj", "v_proj"), "attn_norm"),
                ("mlp", ("gate_proj", "up_proj"), "mlp_norm"))
UNFUSED = (("attn", "o_proj"), ("mlp", "down_proj"))
# The LM head and the norm in front of it (llmx names). The checkpoint yields final_norm before lm_head.
HEAD_GROUP = (("lm_head",), "final_norm")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model: ModelConfig
    dtype: str
    quant: QuantConfig | None
    mapping: Mapping
    provenance: dict
    meta: dict  # the whole llmx.json

    def rank_path(self, rank: int) -> Path:
        return rank_file(self.path, rank)


@dataclass(frozen=True)
class LinearModule:
    """One Linear of the model: its llmx module name, [out_features, in_features] and whether it has a bias."""

    name: str
    out_features: int
    in_features: int
    bias: bool


def rank_file(directory: Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.safetensors"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def llmx_version() -> str:
    return llmx.__version__


def make_provenance(source: Path | str, source_hash: str, **extra: Any) -> dict:
    """Where a checkpoint came from. `extra` adds or overrides fields (modelopt_version, calib_data_hash,
    recipe, dummy_weights, ...); modelopt_version stays null unless passed."""
    provenance = {
        "source": str(source),
        "source_hash": source_hash,
        "llmx_version": llmx_version(),
        "torch_version": package_version("torch"),
        "modelopt_version": None,
        "calib_data_hash": None,
        "recipe": None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance.update(extra)
    return provenance


def write_checkpoint_meta(out_dir: Path, model: ModelConfig, dtype: str, quant: QuantConfig | None,
                          mapping: Mapping, provenance: dict) -> dict:
    """Write `llmx.json` into `out_dir` (a temporary directory of atomic_output_dir) and return it."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": model.to_dict(),
        "dtype": dtype,
        "quantization": quant.to_dict() if quant is not None else None,
        "mapping": mapping.to_dict(),
        "provenance": provenance,
    }
    (Path(out_dir) / CHECKPOINT_FILE).write_text(dumps(meta) + "\n")
    return meta


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint directory's llmx.json; check its rank files exist."""
    path = Path(path)
    if not path.exists():
        raise LlmxError(f"{path} does not exist; pass a directory written by `llmx convert` or `llmx quantize`.")
    if not path.is_dir():
        raise LlmxError(f"{path} is not a directory; pass a checkpoint directory written by `llmx convert`.")
    meta_path = path / CHECKPOINT_FILE
    if not meta_path.exists():
        if (path / "engine.json").exists():
            raise LlmxError(f"{path} is an engine (it holds engine.json), not a checkpoint; pass the checkpoint "
                            "directory it was built from.")
        if (path / "config.json").exists():
            raise LlmxError(f"{path} is a Hugging Face folder, not an llmx checkpoint; run "
                            f"`llmx convert {path} -o CKPT` first.")
        raise LlmxError(f"{path} has no {CHECKPOINT_FILE}; run `llmx convert HF_DIR -o {path}` to create a checkpoint.")
    meta = _read_json(meta_path, "re-create the checkpoint with `llmx convert`")

    if meta.get("format") != CHECKPOINT_FORMAT:
        raise LlmxError(f"{meta_path}: field `format` is {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}; "
                        "this is not an llmx checkpoint, re-create it with `llmx convert`.")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LlmxError(f"{meta_path}: `schema_version` is {version!r} but this llmx reads version {SCHEMA_VERSION}; "
                        "re-create the checkpoint with this llmx's `llmx convert` (or use the llmx that wrote it).")
    model = _parse(meta, meta_path, "model", ModelConfig.from_dict)
    check_model_config(model, meta_path)
    dtype = meta.get("dtype")
    if dtype not in SUPPORTED_DTYPES:
        raise LlmxError(f"{meta_path}: field `dtype` is {dtype!r}; expected one of {', '.join(SUPPORTED_DTYPES)}.")
    quant = _parse(meta, meta_path, "quantization", QuantConfig.from_dict)
    check_quant_config(quant, meta_path)
    mapping = _parse(meta, meta_path, "mapping", Mapping.from_dict)
    if not (isinstance(mapping.tp, int) and isinstance(mapping.pp, int) and mapping.tp >= 1 and mapping.pp >= 1):
        raise LlmxError(f"{meta_path}: field `mapping` must hold positive integers tp and pp, got {meta['mapping']!r}.")
    provenance = meta.get("provenance")
    if not isinstance(provenance, dict):
        raise LlmxError(f"{meta_path}: field `provenance` is missing or not an object; re-create the checkpoint.")
    for rank in range(mapping.world_size):
        if not rank_file(path, rank).is_file():
            raise LlmxError(f"{path}: {rank_file(path, rank).name} is missing (llmx.json declares "
                            f"{mapping.world_size} rank file(s)); re-create the checkpoint.")
    return Checkpoint(path=path, model=model, dtype=dtype, quant=quant, mapping=mapping,
                      provenance=provenance, meta=meta)


def check_model_config(model: ModelConfig, source: Path, *, prefix: str = "model.",
                       remedy: str = "re-create the checkpoint with `llmx convert`") -> None:
    """Refuse a ModelConfig read from a file that the runtime could not run (formats.config.model_config_problem):
    unsupported architecture, a size that is not a positive integer within common.limits, NaN, odd head_dim..."""
    if model.architecture not in SUPPORTED_ARCHITECTURES:
        raise LlmxError(f"{source}: `{prefix}architecture` {model.architecture!r} is not supported; llmx supports "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
    problem = model_config_problem(model)
    if problem is not None:
        field, text = problem
        where = f"field `{prefix}{field}` " if field else "the model's "
        raise LlmxError(f"{source}: {where}{text}; {remedy}.")


def check_quant_config(quant: QuantConfig | None, source: Path, *, prefix: str = "quantization.",
                       remedy: str = "re-create the checkpoint with `llmx quantize`") -> None:
    """Refuse a quantization record whose fields the runtime could not use: group size, KV dtype, exclude list."""
    if quant is None:
        return
    problem = None
    if not isinstance(quant.algo, str):
        problem = "algo", f"must be a format name, got {quant.algo!r}"
    elif quant.group_size is not None and check_number(quant.group_size, SETTING_LIMITS["group_size"]):
        problem = "group_size", (f"must be null or {check_number(quant.group_size, SETTING_LIMITS['group_size'])}, "
                                 f"got {quant.group_size!r}")
    elif quant.kv_cache_dtype not in (None, "fp8", "int8"):
        problem = "kv_cache_dtype", f"must be null, \"fp8\" or \"int8\", got {quant.kv_cache_dtype!r}"
    elif not all(isinstance(name, str) for name in quant.exclude):
        problem = "exclude", f"must be a list of module names, got {list(quant.exclude)!r}"
    elif not isinstance(quant.extra, dict):
        problem = "extra", f"must be an object, got {quant.extra!r}"
    if problem is not None:
        raise LlmxError(f"{source}: field `{prefix}{problem[0]}` {problem[1]}; {remedy}.")


def _read_json(path: Path, remedy: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise LlmxError(f"{path} is not UTF-8 text; {remedy}.") from None
    except json.JSONDecodeError as exc:
        raise LlmxError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); {remedy}.") from None
    if not isinstance(data, dict):
        raise LlmxError(f"{path} does not hold a JSON object; {remedy}.")
    return data


def _parse(meta: dict, meta_path: Path, field: str, parse):
    if field not in meta:
        raise LlmxError(f"{meta_path}: field `{field}` is missing; re-create the checkpoint with `llmx convert`.")
    try:
        return parse(meta[field])
    except (TypeError, ValueError, AttributeError) as exc:
        raise LlmxError(f"{meta_path}: field `{field}` is malformed ({exc}); re-create the checkpoint "
                        "with `llmx convert`.") from None


def mlp_prefixes(model: ModelConfig, layer: int) -> list[str]:
    """The gated MLPs of a layer, each holding gate_proj / up_proj / down_proj: `layers.{i}.mlp` for a dense layer;
    `layers.{i}.mlp.experts.{e}` per expert (then `layers.{i}.mlp.shared_expert`, Qwen2-MoE) for a sparse one."""
    p = f"layers.{layer}.mlp"
    if not model.is_moe_layer(layer):
        return [p]
    shared = [f"{p}.shared_expert"] if model.shared_expert_intermediate_size else []
    return [f"{p}.experts.{e}" for e in range(model.num_experts)] + shared


def linear_modules(model: ModelConfig) -> list[LinearModule]:
    """Every Linear of the checkpoint in layer order; lm_head last unless tied to the embedding.

    A sparse layer's router (and Qwen2-MoE's shared-expert gate) is no Linear here: it stays in the checkpoint
    dtype, never quantized."""
    h = model.hidden_size
    modules = []
    for i in range(model.num_layers):
        p = f"layers.{i}"
        modules += [
            LinearModule(f"{p}.attn.q_proj", model.q_size, h, model.qkv_bias),
            LinearModule(f"{p}.attn.k_proj", model.kv_size, h, model.qkv_bias),
            LinearModule(f"{p}.attn.v_proj", model.kv_size, h, model.qkv_bias),
            LinearModule(f"{p}.attn.o_proj", h, model.q_size, model.o_bias),
        ]
        for mlp in mlp_prefixes(model, i):
            inter = model.mlp_intermediate_size(f"{mlp}.gate_proj")
            modules += [
                LinearModule(f"{mlp}.gate_proj", inter, h, model.mlp_bias),
                LinearModule(f"{mlp}.up_proj", inter, h, model.mlp_bias),
                LinearModule(f"{mlp}.down_proj", h, inter, model.mlp_bias),
            ]
    if not model.tie_word_embeddings:
        modules.append(LinearModule("lm_head", model.vocab_size, h, False))
    return modules


def checkpoint_tensor_specs(model: ModelConfig, dtype: str, quant: QuantConfig | None) -> dict[str, TensorSpec]:
    """Every tensor a (tp=pp=1) checkpoint holds, name -> TensorSpec, in a stable order.

    Linears store what their QuantMethod declares; embeddings, norms and biases stay in `dtype`.
    out_dim/in_dim mark the axes tensor parallelism slices (embed rows follow the vocabulary).
    """
    h = model.hidden_size
    specs: dict[str, TensorSpec] = {"embed.weight": TensorSpec((model.vocab_size, h), dtype, out_dim=(0, 1))}
    linears = {m.name: m for m in linear_modules(model)}
    for i in range(model.num_layers):
        p = f"layers.{i}"
        specs[f"{p}.attn_norm.weight"] = TensorSpec((h,), dtype)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _add_linear(specs, linears[f"{p}.attn.{proj}"], dtype, quant)
        if model.qk_norm:
            specs[f"{p}.attn.q_norm.weight"] = TensorSpec((model.head_dim,), dtype)
            specs[f"{p}.attn.k_norm.weight"] = TensorSpec((model.head_dim,), dtype)
        if quant is not None and quant.kv_cache_dtype is not None:
            for suffix in KV_SCALE_SUFFIXES:
                specs[f"{p}.attn.{suffix}"] = TensorSpec((), "float32")
        if model.family in GEMMA_FAMILIES:  # Gemma's norms after attention and after the MLP
            specs[f"{p}.post_attn_norm.weight"] = TensorSpec((h,), dtype)
        specs[f"{p}.mlp_norm.weight"] = TensorSpec((h,), dtype)
        if model.family in GEMMA_FAMILIES:
            specs[f"{p}.post_mlp_norm.weight"] = TensorSpec((h,), dtype)
        if model.is_moe_layer(i):  # replicated over tensor-parallel ranks (no out_dim)
            specs[f"{p}.mlp.router.weight"] = TensorSpec((model.num_experts, h), dtype)
            if model.shared_expert_intermediate_size:
                specs[f"{p}.mlp.shared_expert_gate.weight"] = TensorSpec((1, h), dtype)
        for mlp in mlp_prefixes(model, i):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                _add_linear(specs, linears[f"{mlp}.{proj}"], dtype, quant)
    specs["final_norm.weight"] = TensorSpec((h,), dtype)
    if "lm_head" in linears:
        _add_linear(specs, linears["lm_head"], dtype, quant)
    return specs


def _add_linear(specs: dict[str, TensorSpec], m: LinearModule, dtype: str, quant: QuantConfig | None) -> None:
    for suffix, spec in method_for(quant, m.name).weight_specs(m.out_features, m.in_features, dtype).items():
        specs[f"{m.name}.{suffix}"] = spec
    if m.bias:
        specs[f"{m.name}.bias"] = TensorSpec((m.out_features,), dtype, out_dim=(0, 1))


def verify_tensors(file: Path, expected: MappingType[str, TensorSpec], remedy: str = "re-create it with "
                   "`llmx convert` (or `llmx quantize`)") -> None:
    """Check a safetensors file holds exactly the expected tensors with their shapes and dtypes.

    Reads only the header. Raises one LlmxError naming the file, the first offending tensor, and the
    expected and found shape/dtype.
    """
    with SafetensorsFile.open(file) as f:
        stored = f.by_name
        for name, spec in expected.items():
            if name not in stored:
                raise LlmxError(f"{file}: tensor `{name}` is missing (expected shape {tuple(spec.shape)} "
                                f"{spec.dtype}); {remedy}.")
            t = stored[name]
            if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                raise LlmxError(f"{file}: tensor `{name}` has shape {tuple(t.shape)} {t.dtype}, expected "
                                f"{tuple(spec.shape)} {spec.dtype} for this model config; {remedy}.")
        extra = [n for n in stored if n not in expected]
        if extra:
            raise LlmxError(f"{file}: holds tensor `{extra[0]}` ({len(extra)} unexpected in all) that the model "
                            f"config does not declare; {remedy}.")


def verify_checkpoint(ckpt: Checkpoint) -> None:
    """Check an unsharded checkpoint's rank0.safetensors against its llmx.json (header only)."""
    if ckpt.mapping.world_size != 1:
        raise LlmxError(f"{ckpt.path}/{CHECKPOINT_FILE} declares mapping tp={ckpt.mapping.tp}, pp={ckpt.mapping.pp}; "
                        "llmx checkpoints are stored unsharded (tp=pp=1): sharding happens at `llmx build`.")
    verify_tensors(ckpt.rank_path(0), checkpoint_tensor_specs(ckpt.model, ckpt.dtype, ckpt.quant))


@contextlib.contextmanager
def open_rank(directory: Path, rank: int) -> Iterator[Any]:
    """`safetensors.safe_open` over rank{rank}.safetensors of a checkpoint or engine directory (CPU, torch)."""
    from safetensors import safe_open

    path = rank_file(directory, rank)
    if not path.is_file():
        raise LlmxError(f"{path} is missing; rebuild the directory with `llmx convert` or `llmx build`.")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        yield handle

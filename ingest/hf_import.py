"""Read a ModelOpt unified HF checkpoint (what `llmx quantize --export-format hf`, ModelOpt's hf_ptq.py and
NVIDIA's published FP8/NVFP4/AWQ checkpoints contain) into an llmx checkpoint, keeping its quantization.

`llmx convert` calls `imported_format(hf_dir)` and, when it names a format, `import_checkpoint(hf_dir, out, ...)`.
compressed-tensors checkpoints (llmx.ingest.compressed_tensors) take the same path: their scheme is read from
config.json, int4 weights are `weight_packed` int32 words, KV-cache scales are `self_attn.k_scale` / `v_scale`.

Formats (hf_quant_config.json `quant_algo` -> llmx algo): each algorithm's `hf_quant_algo` in
llmx.formats.presets.PRESETS (FP8 -> fp8, FP8_PER_CHANNEL_PER_TOKEN -> fp8_pc_pt, W8A8_SQ_PER_CHANNEL -> int8_sq,
W8A16 -> int8_wo, W4A16_AWQ -> int4_awq, W4A8_AWQ -> w4a8_awq, NVFP4 -> nvfp4), absent (KV cache only) -> none.
What differs from llmx's layout:
- int4 (rows with `hf_int4_row_pairs`): ModelOpt packs two output rows per byte (uint8 [N/2, K], two's
  complement nibbles); llmx packs two inputs per byte (uint8 [N, K/2], offset binary).
- Scales take the shape and dtype the format's QuantMethod declares (llmx.formats.checkpoint's tensor specs):
  int4 group scales are float32 there and the activation dtype here, per-channel scales [N, 1] become [N], a
  per-tensor scale of a per-channel format repeats over the rows. Tensors the format does not store are
  dropped: W4A8's `weight_scale_2` (the per-tensor FP8 scale TensorRT-LLM's kernel applies; the group scales
  alone give the weight), int8_sq's static `input_scale` (llmx quantizes SmoothQuant activations per token).
- pre_quant_scale on q/k/v or gate/up (SmoothQuant exports keep it there) is folded into the RMSNorm in
  front when the group shares one vector, as `llmx quantize` does; o_proj/down_proj keep it. A quantized
  lm_head (ModelOpt keeps its AWQ/SmoothQuant vector, having no group to fuse) has it folded into the
  final norm.
- KV-cache scales `self_attn.k_proj.k_scale` / `v_proj.v_scale` become `attn.k_scale` / `attn.v_scale`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmx.common.atomic import atomic_output_dir, check_output_dir
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_files
from llmx.formats.config import PRE_QUANT_SCALE_KEY, SUPPORTED_DTYPES, Mapping, QuantConfig
from llmx.formats.families import hf_to_llmx_name, llmx_to_hf_name, read_hf_config
from llmx.formats.presets import PRESETS, preset_of
from llmx.formats.safetensors_stream import ByteProgress, SafetensorsFile, SafetensorsStreamWriter, TensorEntry
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files, pin_tokenizer_class
from llmx.ingest import compressed_tensors
from llmx.ingest.compressed_tensors import is_compressed_tensors

if TYPE_CHECKING:
    import torch

    from llmx.formats.config import ModelConfig, QuantConfig
    from llmx.formats.weights import TensorSpec

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

HF_QUANT_CONFIG = "hf_quant_config.json"


def quant_algos() -> dict[str | None, str]:
    """ModelOpt's quant_algo -> llmx algo: the rows' `hf_quant_algo`, and none (KV cache only) when absent."""
    return {**{p.hf_quant_algo: name for name, p in PRESETS.items() if p.hf_quant_algo}, None: "none"}


KV_ALGOS = {"FP8": "fp8", "INT8": "int8", None: None}
# What the int4 producers' checkpoints are, for the sentence refusing them.
_NOT_IMPORTED = {
    "awq": "AutoAWQ int4 with a zero point per group, which llmx's symmetric int4 kernels cannot run",
    "gptq": "GPTQ int4 (qweight / qzeros / g_idx packing), which llmx does not import yet",
}


def imported_format(hf_dir: Path | str) -> str | None:
    """"modelopt" or "compressed-tensors" for a quantized folder llmx imports, None for an unquantized one.

    A folder quantized by another producer (quant_method awq, gptq, bitsandbytes, ...) is refused here, in one
    sentence, rather than failing later on tensor names convert does not know.
    """
    hf_dir = Path(hf_dir)
    if is_modelopt_checkpoint(hf_dir):
        return "modelopt"
    quant = _config_quantization(hf_dir)
    if quant is None:
        return None
    if is_compressed_tensors(quant):
        return "compressed-tensors"
    method = quant.get("quant_method")
    why = _NOT_IMPORTED.get(str(method).lower(), "not a format llmx imports (ModelOpt, compressed-tensors)")
    raise LlmxError(f"{hf_dir / 'config.json'}: quantization_config.quant_method {method!r} is {why}; convert the "
                    "unquantized model and quantize it with `llmx quantize`.")


def _config_quantization(hf_dir: Path) -> dict | None:
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) else None


def is_modelopt_checkpoint(hf_dir: Path | str) -> bool:
    """True for an HF folder quantized by ModelOpt (hf_quant_config.json, or quant_method "modelopt")."""
    hf_dir = Path(hf_dir)
    if (hf_dir / HF_QUANT_CONFIG).is_file():
        return True
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "modelopt"


def read_quant_config(hf_dir: Path, model: "ModelConfig | None" = None) -> tuple["QuantConfig", list[str]]:
    """(the llmx QuantConfig, the producer's excluded module names) of a ModelOpt or compressed-tensors checkpoint
    (the latter needs the `model`, whose Linears its `ignore` patterns are matched against)."""
    ct = None if (hf_dir / HF_QUANT_CONFIG).is_file() else _config_quantization(hf_dir)
    if compressed_tensors.is_compressed_tensors(ct):
        if model is None:
            _, model = read_hf_config(hf_dir / "config.json")
        return compressed_tensors.read_quant_config(hf_dir / "config.json", ct, model), list(ct.get("ignore") or [])
    q = _modelopt_quantization(hf_dir)
    source = hf_dir / HF_QUANT_CONFIG
    algo_name, kv_name = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    algos = quant_algos()
    if algo_name not in algos:
        known = ", ".join(str(k) for k in algos if k)
        raise LlmxError(f"{source}: quant_algo {algo_name!r} is not a format llmx runs ({known}); re-quantize the "
                        "unquantized model with `llmx quantize`.")
    if kv_name not in KV_ALGOS:
        raise LlmxError(f"{source}: kv_cache_quant_algo {kv_name!r} is not supported (FP8, INT8 or none).")
    algo, kv = algos[algo_name], KV_ALGOS[kv_name]
    if algo == "none" and kv is None:
        raise LlmxError(f"{source} declares neither weight nor KV-cache quantization; convert the folder without it.")

    preset = preset_of(algo)
    grouped = preset is not None and preset.grouped
    group = q.get("group_size") if grouped else (preset.fixed_group_size if preset is not None else None)
    if grouped and not (isinstance(group, int) and group > 0):
        raise LlmxError(f"{source}: `group_size` is missing or invalid for {algo_name}; re-export the checkpoint.")
    excluded = [str(m) for m in q.get("exclude_modules") or []]
    exclude = tuple(dict.fromkeys(llmx_pattern(m) for m in excluded if llmx_pattern(m) is not None))
    return QuantConfig(algo=algo, group_size=group, kv_cache_dtype=kv, exclude=exclude), excluded


def llmx_pattern(hf_module: str) -> str | None:
    """ModelOpt's excluded module name or glob -> llmx naming; None for modules that are not Linears."""
    name = hf_module.removeprefix("model.")
    if name.startswith("embed_tokens") or name.startswith("norm"):
        return None
    name = name.replace(".self_attn.", ".attn.")
    return name


def import_checkpoint(hf_dir: Path | str, out: Path | str, *, dtype: str | None = None, force: bool = False,
                      trust_remote_code: bool = False, progress: Any = None,
                      provenance_extra: dict | None = None) -> Path:
    """Write the llmx checkpoint of a ModelOpt HF folder to `out` and return `out`.

    dtype: the checkpoint's activation dtype (embeddings, norms, unquantized Linears, 16-bit scales);
    default: the dtype of the folder's embedding. progress: None or a `progress(stage, done, total)` sink
    (llmx.common.progress), advanced by the bytes written. provenance_extra: fields added to the provenance
    (a hub source's repository and commit).
    """
    from llmx.formats.checkpoint import (CHECKPOINT_FILE, checkpoint_tensor_specs, make_provenance, rank_file,
                                         verify_tensors, write_checkpoint_meta)
    from llmx.formats.weights import is_excluded
    from llmx.ingest.convert import check_model_dir, find_weight_files

    hf_dir, out = Path(hf_dir), Path(out)
    check_model_dir(hf_dir)
    _, model = read_hf_config(hf_dir / "config.json")
    quant, _ = read_quant_config(hf_dir, model)
    tokenizer_files = find_tokenizer_files(hf_dir, trust_remote_code=trust_remote_code)
    weight_files, index_file = find_weight_files(hf_dir)
    check_output_dir(out, force=force, marker_files=(CHECKPOINT_FILE,), inputs=(hf_dir,))

    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(SafetensorsFile.open(p)) for p in weight_files]
        reader = _Reader(files, hf_dir, model.family)
        act_dtype = dtype or reader.dtype_of("embed.weight")
        if act_dtype not in SUPPORTED_DTYPES:
            raise LlmxError(f"--dtype {act_dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}.")
        # The stored tensors' shapes and dtypes (pre_quant_scale aside, which the import decides next).
        stored = checkpoint_tensor_specs(model, act_dtype, quant)
        layers = [_import_layer(i, quant, reader, stored, model) for i in range(model.num_layers)]
        if quant.algo != "none" and not model.tie_word_embeddings and not is_excluded("lm_head", quant.exclude):
            layers[-1].tensors.update(_import_head(quant.algo, reader, stored))
        kept = sorted({m for layer in layers for m in layer.pre_quant_scale_modules})
        if kept:
            quant = _with_extra(quant, {PRE_QUANT_SCALE_KEY: kept})
        specs = checkpoint_tensor_specs(model, act_dtype, quant)
        entries = [TensorEntry(n, s.dtype, tuple(s.shape)) for n, s in specs.items()]
        tensors = {name: t for layer in layers for name, t in layer.tensors.items()}
        hashed = sorted([hf_dir / "config.json", hf_dir / HF_QUANT_CONFIG, *weight_files]
                        + ([index_file] if index_file else []))
        with atomic_output_dir(out) as tmp:
            with SafetensorsStreamWriter(rank_file(tmp, 0), entries) as writer:
                bytes_done = ByteProgress(progress, "import", writer.total_bytes)
                for entry in entries:
                    tensor = tensors.pop(entry.name) if entry.name in tensors else reader.read(entry.name)
                    writer.write(entry.name, _cast(tensor, entry.dtype))
                    bytes_done.advance(entry.nbytes)
            copy_files(tokenizer_files, tmp)
            pin_tokenizer_class(hf_dir, tmp)
            provenance = make_provenance(hf_dir.resolve(), hash_files([p for p in hashed if p.is_file()], hf_dir),
                                         **_producer(hf_dir), **(provenance_extra or {}))
            write_checkpoint_meta(tmp, model, act_dtype, quant, Mapping(), provenance)
            verify_tensors(rank_file(tmp, 0), specs)
    return out


class _Reader:
    """llmx tensor name -> the HF tensor, across the folder's shards (one tensor read at a time)."""

    def __init__(self, files: list, hf_dir: Path, family: str):
        self.family = family  # Gemma names its norms its own way

        self.where: dict[str, tuple[Any, str]] = {}
        for f in files:
            for t in f.tensors:
                name = _kv_scale_name(t.name)
                if name is None:
                    try:
                        name = hf_to_llmx_name(t.name, family)
                    except ValueError:
                        raise LlmxError(f"{f.path}: tensor `{t.name}` is not part of a layout llmx knows; check "
                                        "that config.json belongs to these weights.") from None
                if name is not None:
                    self.where[name] = (f, t.name)
        self.hf_dir = hf_dir

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def dtype_of(self, name: str) -> str:
        f, hf_name = self._locate(name)
        return f.by_name[hf_name].dtype

    def read(self, name: str) -> "torch.Tensor":
        f, hf_name = self._locate(name)
        tensor = f.read(hf_name)
        if name.endswith((".k_scale", ".v_scale")) and tensor.numel() == 1:
            return tensor.reshape(())  # compressed-tensors stores the per-tensor KV scales as [1]
        return tensor

    def _locate(self, name: str):
        if name not in self.where:
            hf_name = name if name.endswith(("k_scale", "v_scale")) else llmx_to_hf_name(name, self.family)
            raise LlmxError(f"{self.hf_dir}: tensor `{hf_name}` is missing; the ModelOpt checkpoint is incomplete "
                            "or does not match its hf_quant_config.json, re-export it.")
        return self.where[name]


class _Layer:
    def __init__(self):
        self.tensors: dict[str, "torch.Tensor"] = {}
        self.pre_quant_scale_modules: set[str] = set()


def _import_layer(layer: int, quant: "QuantConfig", reader: _Reader, stored: dict[str, "TensorSpec"],
                  model: "ModelConfig") -> _Layer:
    """The quantized Linears (and any norm a smoothing vector is folded into) of one layer."""
    from llmx.formats.checkpoint import FUSED_GROUPS, UNFUSED, mlp_prefixes
    from llmx.formats.weights import is_excluded

    out = _Layer()
    prefix = f"layers.{layer}"
    if quant.algo == "none":
        return out
    # A sparse layer's experts are MLPs of their own under layers.{i}.mlp.experts.{e} (formats/checkpoint.py).
    blocks = {"attn": [f"{prefix}.attn"], "mlp": mlp_prefixes(model, layer)}
    groups = [(module, projs, norm) for block, projs, norm in FUSED_GROUPS for module in blocks[block]]
    for module, projs, norm in groups:
        names = [f"{module}.{p}" for p in projs if not is_excluded(f"{module}.{p}", quant.exclude)]
        scales = [reader.read(f"{n}.pre_quant_scale") if f"{n}.pre_quant_scale" in reader else None for n in names]
        if any(s is not None for s in scales):
            if any(s is None for s in scales) or any(not _equal(s, scales[0]) for s in scales[1:]):
                raise LlmxError(f"{reader.hf_dir}: {', '.join(names)} carry different pre_quant_scale vectors; llmx "
                                "fuses them into one GEMM and needs one shared vector: re-export the checkpoint.")
            out.tensors.update(_folded_norm(reader, f"{prefix}.{norm}.weight", scales[0]))
        for n in names:
            out.tensors.update(_import_linear(n, quant.algo, reader, stored, keep_pre_quant_scale=False))
    for block, proj in UNFUSED:
        for n in (f"{module}.{proj}" for module in blocks[block]):
            if is_excluded(n, quant.exclude):
                continue
            out.tensors.update(_import_linear(n, quant.algo, reader, stored, keep_pre_quant_scale=True))
            if f"{n}.pre_quant_scale" in out.tensors:
                out.pre_quant_scale_modules.add(f"layers.*.{block}.{proj}")
    return out


def _import_head(algo: str, reader: _Reader, stored: dict[str, "TensorSpec"]) -> dict[str, "torch.Tensor"]:
    """The quantized lm_head; a pre_quant_scale it carries is folded into final_norm, which alone feeds it."""
    tensors = _import_linear("lm_head", algo, reader, stored, keep_pre_quant_scale=False)
    if "lm_head.pre_quant_scale" in reader:
        tensors.update(_folded_norm(reader, "final_norm.weight", reader.read("lm_head.pre_quant_scale")))
    return tensors


def _folded_norm(reader: _Reader, norm_name: str, scale: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """The RMSNorm weight times the smoothing vector of the Linears it feeds (x * s comes out of the norm)."""
    return {norm_name: reader.read(norm_name).float() * scale.float().reshape(-1)}


def _import_linear(name: str, algo: str, reader: _Reader, stored: dict[str, "TensorSpec"], *,
                   keep_pre_quant_scale: bool) -> dict[str, "torch.Tensor"]:
    """The llmx tensors of one quantized Linear: the weight in llmx's packing, and every scale the format stores
    (`stored`: the checkpoint's tensor specs) in its shape and dtype; pre_quant_scale as read, when kept."""
    if f"{name}.weight_packed" in reader:  # compressed-tensors pack-quantized int4, already in llmx's nibble order
        tensors = {"weight": _ct_int4_weight(name, reader)}
    else:
        weight = reader.read(f"{name}.weight")
        tensors = {"weight": _repack_int4(weight) if PRESETS[algo].hf_int4_row_pairs else weight}
    for suffix in ("weight_scale", "input_scale", "weight_scale_2"):
        spec = stored.get(f"{name}.{suffix}")
        if spec is not None:
            tensors[suffix] = _as_stored(reader.read(f"{name}.{suffix}"), spec)
    if keep_pre_quant_scale and f"{name}.pre_quant_scale" in reader:
        tensors["pre_quant_scale"] = reader.read(f"{name}.pre_quant_scale")
    return {f"{name}.{suffix}": t for suffix, t in tensors.items()}


def _as_stored(tensor: "torch.Tensor", spec: "TensorSpec") -> "torch.Tensor":
    """An HF scale in the shape and dtype llmx stores it: [N, 1] -> [N], one scale repeated over the rows where the
    format keeps one per row (compressed-tensors' FP8_DYNAMIC with tensor-wise weights), then cast."""
    import math

    import torch

    shape = tuple(spec.shape)
    if tuple(tensor.shape) != shape:
        if tensor.numel() == math.prod(shape):
            tensor = tensor.reshape(shape)
        elif tensor.numel() == 1:
            tensor = tensor.reshape(()).expand(shape).contiguous()
    return tensor.to(getattr(torch, spec.dtype))


def _ct_int4_weight(name: str, reader: "_Reader") -> "torch.Tensor":
    """compressed-tensors int32 [N, K/8] (inputs 8j..8j+7 from the low nibble up, value + 8) -> llmx uint8
    [N, K/2]: the same nibbles in the same order, so its little-endian bytes, checked against `weight_shape`."""
    import torch

    packed = reader.read(f"{name}.weight_packed")
    rows, cols = (int(v) for v in reader.read(f"{name}.weight_shape").tolist())
    if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, cols // 8) or cols % 8:
        raise LlmxError(f"{reader.hf_dir}: `{name}` weight_packed {packed.dtype} {tuple(packed.shape)} does not hold "
                        f"the [{rows}, {cols}] int4 weight its weight_shape names; re-save the checkpoint.")
    return packed.contiguous().view(torch.uint8)


def _repack_int4(packed_rows: "torch.Tensor") -> "torch.Tensor":
    """ModelOpt uint8 [N/2, K] (byte = row 2i low nibble | row 2i+1 high nibble, two's complement)
    -> llmx uint8 [N, K/2] (byte = input 2j low | input 2j+1 high, offset binary)."""
    import torch

    from llmx.kernels.w4a16_format import pack_int4

    low = (packed_rows & 0x0F).to(torch.int16)
    high = (packed_rows >> 4).to(torch.int16)
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    q = torch.stack([low, high], dim=1).reshape(-1, packed_rows.shape[1])  # rows 2i, 2i+1 interleaved
    return pack_int4(q.to(torch.int8))


def _kv_scale_name(hf_name: str) -> str | None:
    """ModelOpt's `self_attn.k_proj.k_scale` / `v_proj.v_scale`, or compressed-tensors' `self_attn.k_scale` /
    `v_scale` -> `layers.{i}.attn.k_scale` / `v_scale`."""
    parts = hf_name.split(".")
    if len(parts) in (5, 6) and parts[0] == "model" and parts[1] == "layers" and parts[3] == "self_attn":
        if tuple(parts[4:]) in (("k_proj", "k_scale"), ("v_proj", "v_scale"), ("k_scale",), ("v_scale",)):
            return f"layers.{parts[2]}.attn.{parts[-1]}"
    return None


def _cast(tensor: "torch.Tensor", dtype: str) -> "torch.Tensor":
    import torch

    return tensor if str(tensor.dtype).removeprefix("torch.") == dtype else tensor.to(getattr(torch, dtype))


def _equal(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def _with_extra(quant: "QuantConfig", extra: dict) -> "QuantConfig":
    import dataclasses

    return dataclasses.replace(quant, extra={**quant.extra, **extra})


def _modelopt_quantization(hf_dir: Path) -> dict:
    path = hf_dir / HF_QUANT_CONFIG
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LlmxError(f"{path} is not valid JSON ({exc}); re-export the checkpoint.") from None
        q = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(q, dict):
            raise LlmxError(f"{path}: field `quantization` is missing; re-export the checkpoint with ModelOpt.")
        return q
    config = json.loads((hf_dir / "config.json").read_text())
    q = config.get("quantization_config")
    return {"quant_algo": q.get("quant_algo"), "kv_cache_quant_algo": _kv_from_scheme(q.get("kv_cache_scheme")),
            "group_size": q.get("group_size"), "exclude_modules": q.get("ignore")}


def _kv_from_scheme(scheme: Any) -> str | None:
    if not isinstance(scheme, dict):
        return None
    if scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        return "FP8"
    if scheme.get("type") == "int" and scheme.get("num_bits") == 8:
        return "INT8"
    return None


def _producer(hf_dir: Path) -> dict[str, Any]:
    """Provenance fields naming the producer's version: modelopt_version, or compressed_tensors_version."""
    quant = None if (hf_dir / HF_QUANT_CONFIG).is_file() else _config_quantization(hf_dir)
    if is_compressed_tensors(quant):
        return {"compressed_tensors_version": quant.get("version")}
    try:
        data = json.loads((hf_dir / HF_QUANT_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"modelopt_version": None}
    producer = data.get("producer") if isinstance(data, dict) else None
    return {"modelopt_version": producer.get("version") if isinstance(producer, dict) else None}

"""`llmx convert`: a Hugging Face folder (config.json + safetensors) -> an llmx checkpoint, streamed.

Every weight file is validated from its header first (names, shapes against config.json, truncation),
so a bad input fails before anything is written. Then each tensor is read with one positioned read,
cast, renamed and appended to rank0.safetensors: peak memory is about the largest tensor plus its cast
copy, whatever the model size. The same pass feeds every byte of the inputs to the provenance hash, so
the source is read once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.common.atomic import atomic_output_dir, check_free_space, check_output_dir
from llmx.common.errors import LlmxError
from llmx.formats.checkpoint import (CHECKPOINT_FILE, checkpoint_tensor_specs, make_provenance, rank_file,
                                     verify_tensors, write_checkpoint_meta)
from llmx.formats.config import SUPPORTED_DTYPES, Mapping, ModelConfig
from llmx.formats.families import hf_to_llmx_name, llmx_to_hf_name, read_hf_config, split_parts
from llmx.formats.safetensors_stream import (ByteProgress, SafetensorsFile, SafetensorsStreamWriter, StoredTensor,
                                             TensorEntry)
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files, pin_tokenizer_class
from llmx.ingest.dummy import write_dummy_checkpoint
from llmx.ingest.hf_import import import_checkpoint, imported_format
from llmx.ingest.hub import resolve_model_source

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Pickle-based weight files: loading them can execute arbitrary code, so llmx never opens them.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Weight dtypes convert reads; quantized HF checkpoints (fp8, int) go through another path.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class _Item:
    """One stored tensor of the source: converted to `name`, or only hashed when `name` is None."""

    source: SafetensorsFile
    stored: StoredTensor
    name: str | None
    parts: tuple[tuple[str, tuple], ...] = ()  # a fused tensor written in parts (families.split_parts)

    def outputs(self) -> list[tuple[str, tuple]]:
        """(llmx name, index into the stored tensor) for each tensor this item writes."""
        if self.parts:
            return list(self.parts)
        return [] if self.name is None else [(self.name, ())]


def convert(hf_dir: Path | str, out: Path | str, *, dtype: str = "bfloat16", dummy_weights: bool = False,
            force: bool = False, trust_remote_code: bool = False, progress: Any = None) -> Path:
    """Convert an HF model folder, or a hub model ID, into an llmx checkpoint at `out` and return `out`.

    hf_dir: a local folder, or `ORG/NAME[@REVISION]` fetched through huggingface_hub (llmx.ingest.hub; an
    existing local path of that spelling wins); the provenance then records the repository and commit.
    dtype: the checkpoint's float dtype (bfloat16, float16, float32). dummy_weights: ignore the weight
    files and write random weights of the right shapes (llmx.ingest.dummy). force: replace `out` even if
    it holds something other than an llmx checkpoint. trust_remote_code: allow (and copy) a tokenizer
    that needs the folder's custom Python code. progress: None or a `progress(stage, done_bytes,
    total_bytes)` sink (llmx.common.progress). A folder quantized by ModelOpt (hf_quant_config.json) or
    compressed-tensors (FP8, int8, int4) is imported with its quantization by llmx.ingest.hf_import.
    """
    out = Path(out)
    check_dtype(dtype)
    hf_dir, hub = resolve_model_source(hf_dir, trust_remote_code=trust_remote_code, weights=not dummy_weights,
                                       progress=progress)
    origin = hub.provenance() if hub is not None else {}
    check_model_dir(hf_dir)
    if dummy_weights:
        return write_dummy_checkpoint(hf_dir, out, dtype, force=force, trust_remote_code=trust_remote_code,
                                      progress=progress, provenance_extra=origin)

    if imported_format(hf_dir) is not None:  # quantized by ModelOpt or compressed-tensors: keep its weights
        return import_checkpoint(hf_dir, out, dtype=dtype, force=force, trust_remote_code=trust_remote_code,
                                 progress=progress, provenance_extra=origin)

    config_path = hf_dir / "config.json"
    _, model = read_hf_config(config_path)
    tokenizer_files = find_tokenizer_files(hf_dir, trust_remote_code=trust_remote_code)
    weight_files, index_file = find_weight_files(hf_dir)
    check_output_dir(out, force=force, marker_files=(CHECKPOINT_FILE,), inputs=(hf_dir,))

    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(SafetensorsFile.open(p)) for p in weight_files]
        if index_file is not None:
            check_index(index_file, sources)
        items = plan_items(model, dtype, sources, hf_dir)
        specs = checkpoint_tensor_specs(model, dtype, None)
        check_free_space(out, sum(TensorEntry(n, s.dtype, tuple(s.shape)).nbytes for n, s in specs.items()),
                         "checkpoint")
        hashed = sorted([config_path, *weight_files] + ([index_file] if index_file else []))
        with atomic_output_dir(out) as tmp:
            source_hash = _stream(items, hashed, hf_dir, rank_file(tmp, 0), dtype,
                                  ByteProgress(progress, "convert", sum(s.stored.nbytes for s in items)))
            copy_files(tokenizer_files, tmp)
            pin_tokenizer_class(hf_dir, tmp)
            provenance = make_provenance(hf_dir.resolve(), source_hash, **origin)
            write_checkpoint_meta(tmp, model, dtype, None, Mapping(), provenance)
            verify_tensors(rank_file(tmp, 0), specs)
    return out


def check_dtype(dtype: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise LlmxError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}.")


def check_model_dir(hf_dir: Path) -> None:
    if not hf_dir.exists():
        raise LlmxError(f"{hf_dir} does not exist; pass a Hugging Face model folder (config.json + *.safetensors).")
    if not hf_dir.is_dir():
        raise LlmxError(f"{hf_dir} is not a directory; pass a Hugging Face model folder (config.json + *.safetensors).")
    if not (hf_dir / "config.json").is_file():
        raise LlmxError(f"{hf_dir / 'config.json'} is missing; a Hugging Face model folder needs its config.json.")
    for entry in hf_dir.iterdir():
        if entry.is_symlink():
            check_inside_model_dir(hf_dir, entry)


def check_inside_model_dir(hf_dir: Path, path: Path) -> None:
    """Refuse a file of the model folder that resolves outside it through a symlink.

    What convert reads from the folder is copied or converted into its output, so a link to /etc/passwd or
    another user's files must not be followed. A Hugging Face hub cache links `snapshots/<rev>/<file>` to
    `../../blobs/<hash>`: inside a snapshot, the repository's cache folder (`models--<org>--<name>`) is the bound.
    """
    root = hf_dir.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    target = path.resolve()
    if target != root and root not in target.parents:
        raise LlmxError(f"{path} points outside the model folder (to {target}); llmx does not follow links out of "
                        "the folder it converts: copy the file into the folder instead.")


def find_weight_files(hf_dir: Path) -> tuple[list[Path], Path | None]:
    """(weight files, index file or None). A single model.safetensors wins over an index, as in transformers."""
    single, index = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single], None
    if index.is_file():
        weight_map = _read_weight_map(index)
        files = []
        for fname in sorted(set(weight_map.values())):
            path = hf_dir / fname
            if not path.is_file():
                raise LlmxError(f"{index} lists shard {fname} but {path} is missing; re-download the checkpoint.")
            files.append(path)
        return files, index
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in hf_dir.glob(pattern))
    if pickles:
        raise LlmxError(f"{hf_dir} holds PyTorch pickle weights ({pickles[0]}) and no {WEIGHTS_FILE}; llmx never "
                        "unpickles files (loading them can run code): convert them to safetensors in a trusted "
                        "environment (`model.save_pretrained(dir, safe_serialization=True)`) and retry.")
    shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if shards:
        raise LlmxError(f"{hf_dir} holds {shards[0]} but no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; restore the "
                        "index file that lists the shards (re-download the checkpoint).")
    raise LlmxError(f"{hf_dir} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; download the weights, or pass "
                    "--dummy-weights to write random weights of the right shapes.")


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmxError(f"{index} is not valid JSON ({exc}); re-download the checkpoint.") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LlmxError(f"{index}: field `weight_map` is missing or empty; re-download the checkpoint.")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
            raise LlmxError(f"{index}: `weight_map` entry for `{name}` must be a file name in the same folder, "
                            f"got {fname!r}; re-download the checkpoint.")
    return weight_map


def check_index(index: Path, sources: list[SafetensorsFile]) -> None:
    by_file = {s.path.name: s for s in sources}
    for name, fname in _read_weight_map(index).items():
        if name not in by_file[fname]:
            raise LlmxError(f"{index} places tensor `{name}` in {fname}, which does not hold it; the shards do not "
                            "match their index, re-download the checkpoint.")


def plan_items(model: ModelConfig, dtype: str, sources: list[SafetensorsFile], hf_dir: Path) -> list[_Item]:
    """Map every stored tensor to its llmx name and check the set against the model config."""
    expected = checkpoint_tensor_specs(model, dtype, None)
    items: list[_Item] = []
    seen: dict[str, Path] = {}
    for src in sources:
        for t in src.tensors:
            try:
                name = hf_to_llmx_name(t.name, model.family)
            except ValueError:
                raise LlmxError(f"{src.path}: tensor `{t.name}` is not part of the {model.architecture} layout llmx "
                                "knows; check that config.json belongs to these weights.") from None
            if name == "lm_head.weight" and model.tie_word_embeddings:
                name = None  # tied: the runtime reads the embedding, as transformers does
            parts = tuple(split_parts(name, model) or ()) if name is not None else ()
            if parts:
                _check_fused(src.path, t, parts)
                for part, index in parts:
                    _check_tensor(src.path, _part(t, index), part, expected, seen, model)
                    seen[part] = src.path
            elif name is not None:
                _check_tensor(src.path, t, name, expected, seen, model)
                seen[name] = src.path
            items.append(_Item(src, t, name, parts))
    missing = [n for n in expected if n not in seen]
    if missing:
        files = ", ".join(s.path.name for s in sources)
        raise LlmxError(f"{hf_dir}: tensor `{llmx_to_hf_name(missing[0], model.family)}` is missing from {files} "
                        f"({len(missing)} missing in all); the weights are incomplete or do not match config.json, "
                        "re-download the checkpoint.")
    return items


def _part_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    import torch

    return tuple(torch.empty(shape, device="meta")[index].shape)


def _part(t: StoredTensor, index: tuple) -> StoredTensor:
    """The stored tensor's header as one part would have it (for shape checks of a fused tensor's parts)."""
    return dataclasses.replace(t, shape=_part_shape(tuple(t.shape), index))


def _check_fused(path: Path, t: StoredTensor, parts: tuple[tuple[str, tuple], ...]) -> None:
    """The parts (disjoint by construction) must cover the stored tensor exactly: nothing left over, nothing past it."""
    import math

    sizes = [_part_shape(tuple(t.shape), index) for _, index in parts]
    if len(t.shape) < 2 or sum(math.prod(s) for s in sizes) != math.prod(t.shape) or any(0 in s for s in sizes):
        raise LlmxError(f"{path}: tensor `{t.name}` has shape {tuple(t.shape)}, which does not split into the "
                        f"{len(parts)} tensors config.json implies (its fused parts); check that config.json belongs "
                        "to these weights.")


def _check_tensor(path: Path, t: StoredTensor, name: str, expected: dict, seen: dict[str, Path],
                  model: ModelConfig) -> None:
    if name in seen:
        raise LlmxError(f"{path}: tensor `{t.name}` is also stored in {seen[name].name}; remove the duplicate shard.")
    if name not in expected:
        raise LlmxError(f"{path}: tensor `{t.name}` is not expected for this {model.architecture} config.json "
                        "(e.g. a bias or norm the config does not enable); check that config.json belongs to "
                        "these weights.")
    if t.dtype not in FLOAT_DTYPES:
        raise LlmxError(f"{path}: tensor `{t.name}` is stored as {t.dtype}; `llmx convert` reads "
                        f"{', '.join(FLOAT_DTYPES)} weights (quantize a float checkpoint with `llmx quantize`).")
    want = tuple(expected[name].shape)
    if tuple(t.shape) != want:
        raise LlmxError(f"{path}: tensor `{t.name}` has shape {tuple(t.shape)} but config.json implies {want}; "
                        "check that config.json belongs to these weights.")


def _stream(items: list[_Item], hashed_files: list[Path], root: Path, out_file: Path, dtype: str,
            progress: ByteProgress) -> str:
    """Write the converted tensors to `out_file`; return the sha256 of the inputs (as common.hashing.hash_files).

    Inputs are visited in hash order (sorted file names, then each safetensors file front to back), so
    the hash sees each file's exact bytes while tensors are read once.
    """
    import torch

    target = getattr(torch, dtype)
    per_file: dict[Path, list[_Item]] = {}
    for item in items:
        per_file.setdefault(item.source.path, []).append(item)
    ordered = [i for path in hashed_files for i in sorted(per_file.get(path, []), key=lambda i: i.stored.start)]
    entries = [TensorEntry(name, dtype, _part_shape(tuple(i.stored.shape), index))
               for i in ordered for name, index in i.outputs()]

    hasher = hashlib.sha256()
    with SafetensorsStreamWriter(out_file, entries) as writer:
        for path in hashed_files:
            hasher.update(str(path.relative_to(root)).encode() + b"\0")
            file_items = sorted(per_file.get(path, []), key=lambda i: i.stored.start)
            if not file_items:  # config.json, the index, or a weight file without tensors: hash it whole
                hasher.update(path.read_bytes())
                continue
            hasher.update(file_items[0].source.header_bytes)
            for item in file_items:
                tensor = item.source.read(item.stored.name, hasher)
                for name, index in item.outputs():
                    writer.write(name, tensor[index].to(target).contiguous())
                del tensor
                progress.advance(item.stored.nbytes)
    return "sha256:" + hasher.hexdigest()


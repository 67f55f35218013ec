"""`llmx convert --dummy-weights`: a checkpoint of random weights from config.json alone.

For speed work (benchmarks need the shapes, not trained values) without downloading weights. Weights
are normal(0, 0.02), norms are 1. Each tensor is generated and written in slabs of rows, so even a
Llama-3.1-8B checkpoint (16 GB in bf16, a 1 GB embedding) is produced with about 64 MiB of working memory.
Each tensor's values depend only on (seed, name), never on which tensors come before it.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any, Iterator

from llmx.common.atomic import atomic_output_dir, check_output_dir
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_files
from llmx.formats.checkpoint import (CHECKPOINT_FILE, checkpoint_tensor_specs, make_provenance, rank_file,
                                     write_checkpoint_meta)
from llmx.formats.config import SUPPORTED_DTYPES, Mapping
from llmx.formats.families import read_hf_config
from llmx.formats.safetensors_stream import ByteProgress, SafetensorsStreamWriter, TensorEntry
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files
from llmx.formats.weights import TensorSpec

INIT_STD = 0.02
# float32 elements generated per slab: 16 Mi elements = 64 MiB, before the cast to the checkpoint dtype.
SLAB_ELEMENTS = 1 << 24
_NORM_SUFFIXES = ("attn_norm.weight", "mlp_norm.weight", "final_norm.weight", "q_norm.weight", "k_norm.weight")


def write_dummy_checkpoint(config_json_path_or_dir: Path | str, out: Path | str, dtype: str = "bfloat16",
                           seed: int = 0, force: bool = False, *, trust_remote_code: bool = False,
                           progress: Any = None, provenance_extra: dict | None = None) -> Path:
    """Write an llmx checkpoint of random weights shaped by a config.json (file, or the folder holding it).

    Tokenizer files next to config.json are copied. provenance_extra: fields added to the provenance (a hub
    source's repository and commit). Returns `out`.
    """
    src, out = Path(config_json_path_or_dir), Path(out)
    if not src.exists():
        raise LlmxError(f"{src} does not exist; pass a config.json or the model folder holding it.")
    config_path = src / "config.json" if src.is_dir() else src
    if dtype not in SUPPORTED_DTYPES:
        raise LlmxError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}.")
    _, model = read_hf_config(config_path)
    tokenizer_files = find_tokenizer_files(config_path.parent, trust_remote_code=trust_remote_code)
    specs = checkpoint_tensor_specs(model, dtype, None)
    check_output_dir(out, force=force, marker_files=(CHECKPOINT_FILE,), inputs=(config_path.parent,))

    entries = [TensorEntry(name, spec.dtype, tuple(spec.shape)) for name, spec in specs.items()]
    bar = ByteProgress(progress, "dummy weights", sum(e.nbytes for e in entries))
    with atomic_output_dir(out) as tmp:
        with SafetensorsStreamWriter(rank_file(tmp, 0), entries) as writer:
            for entry, spec in zip(entries, specs.values()):
                writer.write_chunks(entry.name, random_slabs(entry.name, spec, seed), shape=entry.shape)
                bar.advance(entry.nbytes)
        copy_files(tokenizer_files, tmp)
        provenance = make_provenance(config_path.resolve(), hash_files([config_path]), dummy_weights=True, seed=seed,
                                     **(provenance_extra or {}))
        write_checkpoint_meta(tmp, model, dtype, None, Mapping(), provenance)
    return out


def random_slabs(name: str, spec: TensorSpec, seed: int) -> Iterator[Any]:
    """The tensor `name` as consecutive slabs of rows (dim 0), in spec.dtype: ones for norms, else N(0, 0.02)."""
    import torch

    dtype = getattr(torch, spec.dtype)
    shape = tuple(spec.shape)
    if not shape:
        yield torch.ones((), dtype=dtype)
        return
    row_elements = math.prod(shape[1:])
    rows_per_slab = max(1, SLAB_ELEMENTS // max(1, row_elements))
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    for start in range(0, shape[0], rows_per_slab):
        rows = min(rows_per_slab, shape[0] - start)
        if is_norm_weight(name):
            yield torch.ones((rows, *shape[1:]), dtype=dtype)
        else:
            yield (torch.randn((rows, *shape[1:]), generator=generator) * INIT_STD).to(dtype)


def is_norm_weight(name: str) -> bool:
    """Whether the dummy value of tensor `name` is ones (an RMSNorm weight) rather than N(0, INIT_STD)."""
    return name.endswith(_NORM_SUFFIXES)


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63)

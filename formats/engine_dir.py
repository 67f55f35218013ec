"""The engine directory: engine.json's format, reading and validating it, and whether this machine can run it.

`llmx build` (llmx.build.engine) writes engine directories; the runtime, `llmx bench --endpoint` and the
evaluation read them through `read_engine` and `check_engine_runnable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.formats.checkpoint import check_model_config, check_quant_config, llmx_version, rank_file
from llmx.formats.config import (SUPPORTED_DTYPES, BuildConfig, Mapping, ModelConfig, QuantConfig, build_config_problem,
                                 mapping_problem)
from llmx.formats.tokenizer_check import check_tokenizer_files

ENGINE_FILE = "engine.json"
ENGINE_FORMAT = "llmx-engine"
ENGINE_SCHEMA_VERSION = 1
# The layout of the rank files; bump it when the runtime can no longer load engines built before.
ENGINE_FORMAT_VERSION = 1
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Engine:
    path: Path
    meta: dict  # the whole engine.json
    model: ModelConfig
    dtype: str
    quant: QuantConfig | None
    build: BuildConfig
    mapping: Mapping
    target: dict

    def rank_path(self, rank: int) -> Path:
        return rank_file(self.path, rank)


def read_engine(path: Path | str) -> Engine:
    """Read and validate an engine directory's engine.json (weights are checked by the runtime loader)."""
    path = Path(path)
    meta_path = path / ENGINE_FILE
    if not path.is_dir():
        raise LlmxError(f"{path} is not an engine directory; build one with `llmx build CKPT -o {path}`.")
    if not meta_path.is_file():
        hint = " (it is a checkpoint: build it)" if (path / "llmx.json").exists() else ""
        raise LlmxError(f"{path} has no {ENGINE_FILE}{hint}; run `llmx build CKPT -o {path}` to create the engine.")
    remedy = f"rebuild it with `llmx build CKPT -o {path}`"
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmxError(f"{meta_path} is not valid JSON ({exc}); {remedy}.") from None
    if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
        raise LlmxError(f"{meta_path} is not an llmx engine description (`format` should be {ENGINE_FORMAT!r}); "
                        f"{remedy}.")
    if meta.get("schema_version") != ENGINE_SCHEMA_VERSION:
        raise LlmxError(f"{meta_path}: `schema_version` is {meta.get('schema_version')!r} but this llmx reads "
                        f"{ENGINE_SCHEMA_VERSION}; {remedy}.")
    try:
        ckpt_meta = meta["checkpoint"]
        model = ModelConfig.from_dict(ckpt_meta["model"])
        dtype = ckpt_meta["dtype"]
        quant = QuantConfig.from_dict(ckpt_meta.get("quantization"))
        build = BuildConfig.from_dict(meta["build"])
        mapping = Mapping.from_dict(meta["mapping"])
        target = dict(meta["target"])
    except KeyError as exc:
        raise LlmxError(f"{meta_path} is malformed (field {exc} is missing); {remedy}.") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise LlmxError(f"{meta_path} is malformed ({exc}); {remedy}.") from None
    check_model_config(model, meta_path, prefix="checkpoint.model.", remedy=remedy)
    check_quant_config(quant, meta_path, prefix="checkpoint.quantization.", remedy=remedy)
    if not isinstance(meta.get("versions"), dict):
        raise LlmxError(f"{meta_path}: field `versions` is missing or not an object (which llmx and engine format "
                        f"built it); {remedy}.")
    for section, problem in (("build", build_config_problem(build)), ("mapping", mapping_problem(mapping))):
        if problem is not None:
            raise LlmxError(f"{meta_path}: field `{section}.{problem[0]}` {problem[1]}; {remedy}.")
    if target.get("device") not in DEVICES:
        raise LlmxError(f"{meta_path}: `target.device` is {target.get('device')!r}; {remedy}.")
    _check_rank_files(path, mapping.world_size, meta.get("files"), remedy)
    check_tokenizer_files(path, remedy)
    if dtype not in SUPPORTED_DTYPES:
        raise LlmxError(f"{meta_path}: `checkpoint.dtype` is {dtype!r}; {remedy}.")
    return Engine(path=path, meta=meta, model=model, dtype=dtype, quant=quant, build=build, mapping=mapping,
                  target=target)


def _check_rank_files(path: Path, world_size: int, sizes: Any, remedy: str) -> None:
    """Every rank file is there with the size the build recorded: a copy cut short (full disk, interrupted
    transfer) is named here, in one sentence, instead of failing deep inside the weight loader."""
    for rank in range(world_size):
        file = rank_file(path, rank)
        if not file.is_file():
            raise LlmxError(f"{file} is missing (engine.json declares {world_size} rank file(s)); {remedy}.")
        recorded = sizes.get(file.name) if isinstance(sizes, dict) else None
        size = file.stat().st_size
        if isinstance(recorded, int) and size != recorded:
            raise LlmxError(f"{file} holds {size:,} bytes but the build wrote {recorded:,} (engine.json `files`): "
                            f"it was cut short or changed after the build; {remedy}.")


def check_engine_runnable(engine: Engine, *, device: str, world_size: int | None = None) -> None:
    """Refuse, in one sentence saying what to rebuild, an engine this machine/launch cannot run."""
    path = engine.path
    ckpt = engine.meta.get("checkpoint_dir") or "CKPT"
    versions = engine.meta.get("versions", {})
    if versions.get("engine_format") != ENGINE_FORMAT_VERSION:
        raise LlmxError(f"{path} was built by llmx {versions.get('llmx')} in engine format "
                        f"{versions.get('engine_format')}, but this llmx {llmx_version()} reads format "
                        f"{ENGINE_FORMAT_VERSION}; rebuild it with `llmx build {ckpt} -o {path}`.")
    m = engine.mapping
    if world_size is not None and world_size != m.world_size:
        raise LlmxError(f"{path} was built for {m.world_size} rank(s) (tp={m.tp}, pp={m.pp}) but {world_size} "
                        f"were launched; launch {m.world_size}, or rebuild it with `llmx build {ckpt} -o {path} "
                        f"--tp {world_size} --pp 1`.")
    built = engine.target.get("device")
    built_cc = engine.target.get("compute_capability")
    built_name = engine.target.get("device_name")
    if device == built == "cpu":
        return
    if built == "cpu":
        raise LlmxError(f"{path} was built for the CPU; rebuild it for the GPU with "
                        f"`llmx build {ckpt} -o {path} --device cuda`.")
    if device != "cuda":
        raise LlmxError(f"{path} was built for compute capability {built_cc} ({built_name}); run it on such a GPU, "
                        f"or rebuild it with `llmx build {ckpt} -o {path} --device cpu`.")
    import torch

    if not torch.cuda.is_available():
        raise LlmxError(f"{path} was built for compute capability {built_cc} ({built_name}) but no GPU is visible "
                        f"here; run it on such a GPU, or rebuild it with `llmx build {ckpt} -o {path} --device cpu`.")
    major, minor = torch.cuda.get_device_capability()
    here = f"{major}.{minor}"
    if here != built_cc:
        raise LlmxError(f"{path} was built for compute capability {built_cc} ({built_name}) but this GPU is {here} "
                        f"({torch.cuda.get_device_name()}); rebuild it here with `llmx build {ckpt} -o {path}`.")

"""`llmx build`: an llmx checkpoint -> an engine directory laid out for the runtime, and its validation.

An engine holds `engine.json` (docs/ARCHITECTURE.md), one `rank{r}.safetensors` per rank with that rank's
slices already fused the way the runtime's layers read them (q/k/v -> qkv_proj, gate/up -> gate_up_proj),
and the tokenizer files. Builds are keyed by an input hash over the checkpoint's metadata and file
stats, the build options, the mapping, the target device and the llmx version: an unchanged build is
reused in milliseconds instead of rewritten. A CUDA build of a format with Triton GEMMs also tunes their
tile configs for this GPU (llmx.build.tune) and stores them in engine.json `build.kernels["gemm_tiles"]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.build.tune import TuneReport, gemm_shapes, tune_for_engine
from llmx.common.atomic import atomic_output_dir, check_free_space, check_output_dir
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_json
from llmx.common.jsonio import dumps
from llmx.formats.checkpoint import (Checkpoint, checkpoint_tensor_specs, llmx_version, mlp_prefixes, package_version,
                                     rank_file, read_checkpoint, verify_checkpoint)
from llmx.formats.config import FP8_MIN_COMPUTE_CAPABILITY, BuildConfig, Mapping, ModelConfig, build_config_problem
from llmx.formats.engine_dir import DEVICES, ENGINE_FILE, ENGINE_FORMAT, ENGINE_FORMAT_VERSION, ENGINE_SCHEMA_VERSION
from llmx.formats.presets import algos_without_fp8, fp8_algos
from llmx.formats.safetensors_stream import ByteProgress, SafetensorsFile, SafetensorsStreamWriter, TensorEntry
from llmx.formats.shard import (kv_heads_per_rank, layout_summary, local_features, rank_holds, shard_spec, shard_tensor,
                                split_name, stage_layers, validate_mapping)
from llmx.formats.tokenizer_check import check_tokenizer_files
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files
from llmx.formats.weights import QuantMethod, TensorSpec, method_for
from llmx.formats.weights.kv_cache import KV_CACHE_DTYPES


@dataclass(frozen=True)
class BuildResult:
    path: Path
    reused: bool
    seconds: float
    tuning: TuneReport | None = None  # None when the build did not try to tune (cpu, --no-tune, reused)


def build_engine(ckpt_dir: Path | str, out: Path | str, build: BuildConfig, mapping: Mapping = Mapping(), *,
                 force: bool = False, recipe: str | Path | None = None, progress: Any = None,
                 tune: bool = True) -> BuildResult:
    """Build (or reuse) the engine for `ckpt_dir` at `out`.

    An existing engine at `out` built from the same inputs is returned untouched with reused=True;
    `force` rebuilds it anyway and may replace a directory llmx did not write. `recipe` is recorded in
    engine.json. progress: None or a `progress(stage, done, total)` sink (llmx.common.progress). `tune`: time the
    Triton GEMM tile configs of a CUDA build on this GPU (False: the runtime uses default tiles).
    """
    start = time.perf_counter()
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    ckpt = read_checkpoint(ckpt_dir)
    if ckpt.mapping.world_size != 1:
        raise LlmxError(f"{ckpt_dir}/llmx.json declares mapping tp={ckpt.mapping.tp}, pp={ckpt.mapping.pp}; "
                        "`llmx build` shards unsharded checkpoints (tp=pp=1): re-create it with `llmx convert`.")
    build = resolve_build_config(build, ckpt)
    validate_mapping(ckpt.model, mapping, ckpt.quant, ckpt.dtype)
    target = detect_target(build.device)
    check_target_supports(ckpt, target)
    check_fits_in_memory(ckpt, build, mapping, target)
    tune_gemm = tune and target["device"] == "cuda" and bool(gemm_shapes(ckpt.model, ckpt.quant, mapping))
    input_hash = engine_input_hash(ckpt, build, mapping, target, recipe, tune_gemm=tune_gemm)
    if not force and _reusable(out, input_hash, mapping.world_size):
        return BuildResult(out, True, time.perf_counter() - start)

    check_output_dir(out, force=force, marker_files=(ENGINE_FILE,), inputs=(ckpt_dir,))
    verify_checkpoint(ckpt)
    check_tokenizer_files(ckpt_dir, "re-create the checkpoint with `llmx convert` from a model folder whose "
                                    "tokenizer files are intact")
    plan = _plan(ckpt, mapping)
    # the engine holds the checkpoint's weights resharded (replicated norms add a few kilobytes a rank)
    check_free_space(out, sum(f.stat().st_size for f in Path(ckpt_dir).glob("rank*.safetensors")), "engine")
    tokenizer_files = find_tokenizer_files(ckpt_dir, trust_remote_code=True)  # vetted when the checkpoint was made
    tuned = None
    if tune_gemm:  # before writing anything: a GPU that cannot run any tile fails the build in seconds
        tuned = tune_for_engine(ckpt.model, ckpt.quant, ckpt.dtype, mapping, build.max_num_tokens, progress=progress)
        if tuned.table is not None:
            build = dataclasses.replace(build, kernels={**build.kernels, "gemm_tiles": tuned.table})
    with atomic_output_dir(out) as tmp:
        _write_rank_files(ckpt, mapping, plan, tmp, progress)
        copy_files(tokenizer_files, tmp)
        meta = {
            "format": ENGINE_FORMAT,
            "schema_version": ENGINE_SCHEMA_VERSION,
            "checkpoint": ckpt.meta,
            "checkpoint_dir": str(ckpt_dir.resolve()),
            "build": build.to_dict(),
            "mapping": mapping.to_dict(),
            "target": target,
            "layout": layout_summary(ckpt.model, mapping),
            "versions": {"llmx": llmx_version(), "torch": package_version("torch"),
                         "engine_format": ENGINE_FORMAT_VERSION},
            "recipe": str(recipe) if recipe is not None else None,
            "files": {rank_file(tmp, r).name: rank_file(tmp, r).stat().st_size for r in range(mapping.world_size)},
            "input_hash": input_hash,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / ENGINE_FILE).write_text(dumps(meta) + "\n")
    return BuildResult(out, False, time.perf_counter() - start, tuned)


def resolve_build_config(build: BuildConfig, ckpt: Checkpoint) -> BuildConfig:
    """Validate build options against the checkpoint; a quantized KV cache defaults to the checkpoint's."""
    if build.device not in DEVICES:
        raise LlmxError(f"--device {build.device!r} is not supported; choose one of {', '.join(DEVICES)}.")
    problem = build_config_problem(build)
    if problem is not None:
        raise LlmxError(f"build option `{problem[0]}` {problem[1]}.")
    ckpt_kv = ckpt.quant.kv_cache_dtype if ckpt.quant is not None else None
    kv = build.kv_cache_dtype
    if kv is not None and kv not in KV_CACHE_DTYPES:
        raise LlmxError(f"build option `kv_cache_dtype` {kv!r} is not supported; choose one of "
                        f"{', '.join(KV_CACHE_DTYPES)} or leave it unset for the model dtype.")
    if kv is None:
        return dataclasses.replace(build, kv_cache_dtype=ckpt_kv)
    if ckpt_kv is not None and kv != ckpt_kv:
        raise LlmxError(f"--kv-cache-dtype {kv} differs from the {ckpt_kv} KV-cache scales calibrated in "
                        f"{ckpt.path}; leave it unset or re-quantize with --kv-cache-dtype {kv}.")
    if kv == "int8" and ckpt_kv is None:
        raise LlmxError(f"--kv-cache-dtype int8 needs calibrated KV scales, which {ckpt.path} does not hold; "
                        "run `llmx quantize --kv-cache-dtype int8` first.")
    return build


def detect_target(device: str) -> dict[str, Any]:
    """What this build targets: the GPU's name and compute capability, or the CPU."""
    if device == "cpu":
        return {"device": "cpu", "device_name": f"cpu ({platform.machine() or 'unknown'})",
                "compute_capability": None, "backend": "torch"}
    import torch

    if not torch.cuda.is_available():
        raise LlmxError("--device cuda was requested but no CUDA GPU is visible here; build with --device cpu, "
                        "or on the GPU that will run the engine.")
    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "device_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "backend": "torch"}


def check_target_supports(ckpt: Checkpoint, target: dict[str, Any]) -> None:
    """Refuse FP8 formats (weights, activations, scales or KV cache) on GPUs without FP8 support."""
    if target["compute_capability"] is None or ckpt.quant is None:
        return
    capability = tuple(int(v) for v in target["compute_capability"].split("."))
    needs = [f"--algo {ckpt.quant.algo}"] if ckpt.quant.algo in fp8_algos() else []
    if ckpt.quant.kv_cache_dtype == "fp8":
        needs.append("--kv-cache-dtype fp8")
    if needs and capability < FP8_MIN_COMPUTE_CAPABILITY:
        raise LlmxError(f"{ckpt.path} was quantized with {' and '.join(needs)}, which needs FP8 support (compute "
                        f"capability 8.9+), but {target['device_name']} is {target['compute_capability']}; "
                        f"re-quantize with one of {', '.join(algos_without_fp8())} (and an int8 KV cache) for it.")


def device_memory_bytes(target: dict[str, Any]) -> int | None:
    """Total memory of the build's target device (this machine's RAM for cpu), None when unknown."""
    if target["device"] == "cuda":
        import torch

        try:
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        except (RuntimeError, AssertionError):  # torch without CUDA behind a simulated GPU (tests): unknown
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check_fits_in_memory(ckpt: Checkpoint, build: BuildConfig, mapping: Mapping, target: dict[str, Any]) -> None:
    """Refuse an engine that cannot run on its target: one rank's weights plus the KV cache of a single
    sequence of max_seq_len tokens must fit in the device's memory (the runtime needs at least that)."""
    import torch

    capacity = device_memory_bytes(target)
    if capacity is None:
        return
    model = ckpt.model
    kv_itemsize = 1 if build.kv_cache_dtype in KV_CACHE_DTYPES else getattr(torch, ckpt.dtype).itemsize
    layers = max(len(stage_layers(model.num_layers, mapping.pp, r)) for r in range(mapping.pp))
    per_token = 2 * layers * kv_heads_per_rank(model.num_kv_heads, mapping.tp) * model.head_dim * kv_itemsize
    sequence = per_token * build.max_seq_len
    weights = ckpt.rank_path(0).stat().st_size // mapping.world_size
    if weights + sequence > capacity:
        raise LlmxError(f"max_seq_len {build.max_seq_len:,}: one sequence's KV cache takes {_size(sequence)} and the "
                        f"weights {_size(weights)} per rank, more than the {_size(capacity)} of "
                        f"{target['device_name']}; lower --max-seq-len, quantize the KV cache "
                        "(`llmx quantize --kv-cache-dtype`) or split the model over more ranks (--tp/--pp).")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def engine_input_hash(ckpt: Checkpoint, build: BuildConfig, mapping: Mapping, target: dict,
                      recipe: str | Path | None, *, tune_gemm: bool = False) -> str:
    """Hash of everything a build depends on, cheap to compute: the checkpoint's llmx.json (which holds the
    source content hash) plus name, size and mtime of its files instead of their multi-GB contents.

    `tune_gemm`: whether this build tunes GEMM tiles (a CUDA build of Triton-GEMM formats without --no-tune).
    The tuned table itself is an output, not an input: the GPU model, which decides it, is in `target`.
    """
    files = sorted(p for p in ckpt.path.iterdir() if p.is_file())
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    inputs = {
        "checkpoint": ckpt.meta,
        "checkpoint_files": stats,
        "build": build.to_dict(),
        "mapping": mapping.to_dict(),
        "target": target,
        "llmx": llmx_version(),
        "engine_format": ENGINE_FORMAT_VERSION,
        "recipe": str(recipe) if recipe is not None else None,
    }
    if tune_gemm:  # only then, so engines that never tune keep the hash they had before tuning existed
        inputs["tune_gemm"] = True
    return hash_json(inputs)


def _reusable(out: Path, input_hash: str, world_size: int) -> bool:
    try:
        meta = json.loads((out / ENGINE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("input_hash") != input_hash:
        return False
    sizes = meta.get("files") or {}
    for r in range(world_size):
        path = rank_file(out, r)
        if not path.is_file() or sizes.get(path.name) != path.stat().st_size:
            return False
    return True


@dataclass(frozen=True)
class _Group:
    """Checkpoint tensors read together and the engine tensors made from them.

    A plain group copies one tensor (sliced per rank). A fused group concatenates the outputs of
    `modules` (q/k/v or gate/up) into `fused` via their common QuantMethod, biases included.
    """

    sources: tuple[str, ...]
    fused: str | None = None
    modules: tuple[str, ...] = ()
    method: QuantMethod | None = None


def _plan(ckpt: Checkpoint, mapping: Mapping) -> list[_Group]:
    model, quant = ckpt.model, ckpt.quant
    specs = checkpoint_tensor_specs(model, ckpt.dtype, quant)
    fused_of = {}
    for i in range(model.num_layers):
        fused_of[f"layers.{i}.attn.q_proj"] = (f"layers.{i}.attn.qkv_proj",
                                               tuple(f"layers.{i}.attn.{p}_proj" for p in "qkv"))
        for mlp in mlp_prefixes(model, i):  # the dense MLP, or each expert of a sparse layer
            fused_of[f"{mlp}.gate_proj"] = (f"{mlp}.gate_up_proj", (f"{mlp}.gate_proj", f"{mlp}.up_proj"))
    absorbed = {m for _, modules in fused_of.values() for m in modules[1:]}
    groups, done = [], set()
    for name in specs:
        module, _ = split_name(name)
        if module in fused_of and module not in done:
            fused, modules = fused_of[module]
            methods = [method_for(quant, m) for m in modules]
            if len({type(m) for m in methods}) != 1:
                raise LlmxError(f"{' / '.join(m.rsplit('.', 1)[1] for m in modules)} of {module.rsplit('.', 2)[0]} "
                                f"use different weight formats ({', '.join(m.name for m in methods)}) in {ckpt.path}; "
                                "quantize or exclude them together so they can be fused.")
            sources = tuple(n for n in specs if split_name(n)[0] in modules)
            groups.append(_Group(sources, fused, modules, methods[0]))
            done.add(module)
        elif module not in fused_of and module not in absorbed:
            groups.append(_Group((name,)))
    return groups


def _rank_outputs(group: _Group, ckpt: Checkpoint, specs: dict[str, TensorSpec], mapping: Mapping,
                  rank: int) -> dict[str, TensorSpec]:
    """Names and specs of the engine tensors `group` contributes to `rank`, in write order."""
    model = ckpt.model
    if group.fused is None:
        name = group.sources[0]
        return {name: shard_spec(name, specs[name], model, mapping, rank)}
    out_features = sum(local_features(m, model, mapping.tp, mapping.ep)[0] for m in group.modules)
    in_features = local_features(group.modules[0], model, mapping.tp, mapping.ep)[1]
    fused_specs = group.method.weight_specs(out_features, in_features, ckpt.dtype)
    outputs = {f"{group.fused}.{suffix}": spec for suffix, spec in fused_specs.items()}
    if f"{group.modules[0]}.bias" in specs:
        outputs[f"{group.fused}.bias"] = TensorSpec((out_features,), ckpt.dtype, out_dim=(0, 1))
    return outputs


def _write_rank_files(ckpt: Checkpoint, mapping: Mapping, plan: list[_Group], out_dir: Path, progress: Any) -> None:
    model = ckpt.model
    specs = checkpoint_tensor_specs(model, ckpt.dtype, ckpt.quant)
    world = mapping.world_size
    holders = [[r for r in range(world) if rank_holds(g.sources[0], model, mapping, r)] for g in plan]
    declared: list[list[TensorEntry]] = [[] for _ in range(world)]
    for group, ranks in zip(plan, holders):
        for r in ranks:
            declared[r] += [TensorEntry(n, s.dtype, tuple(s.shape))
                            for n, s in _rank_outputs(group, ckpt, specs, mapping, r).items()]
    bar = ByteProgress(progress, "build", sum(e.nbytes for entries in declared for e in entries))

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(SafetensorsFile.open(ckpt.rank_path(0)))
        writers = [stack.enter_context(SafetensorsStreamWriter(rank_file(out_dir, r), declared[r],
                                                               {"format": "pt", "rank": str(r)}))
                   for r in range(world)]
        for group, ranks in zip(plan, holders):
            full = {n: source.read(n) for n in group.sources}
            for r in ranks:
                tensors = _make_rank_tensors(group, full, specs, model, mapping, r)
                for name, spec in _rank_outputs(group, ckpt, specs, mapping, r).items():
                    if name not in tensors:
                        raise RuntimeError(f"{group.method.name}.fuse_outputs did not return `{name.rsplit('.', 1)[1]}`")
                    writers[r].write(name, tensors[name])
                    bar.advance(tensors[name].numel() * tensors[name].element_size())
            del full


def _make_rank_tensors(group: _Group, full: dict, specs: dict[str, TensorSpec], model: ModelConfig,
                       mapping: Mapping, rank: int) -> dict:
    """Rank `rank`'s engine tensors of one group: sliced, and for q/k/v and gate/up fused."""
    import torch

    def piece(name: str):
        return shard_tensor(name, full[name], specs[name], model, mapping, rank)

    if group.fused is None:
        name = group.sources[0]
        return {name: piece(name)}
    parts = []
    for m in group.modules:
        suffixes = [split_name(n)[1] for n in group.sources if split_name(n)[0] == m and not n.endswith(".bias")]
        parts.append({s: piece(f"{m}.{s}") for s in suffixes})
    tensors = {f"{group.fused}.{s}": t for s, t in group.method.fuse_outputs(parts).items()}
    if f"{group.modules[0]}.bias" in full:
        tensors[f"{group.fused}.bias"] = torch.cat([piece(f"{m}.bias") for m in group.modules])
    return tensors

"""GEMM tile tuning at `llmx build`: the GEMM shapes an engine's ranks launch, timing them on this GPU, and
a per-user cache of the winners.

The quantized Linears run Triton GEMMs (llmx.kernels.*_gemm) whose fastest tile configuration depends on
the GPU, the kernel, the weight shape (N, K) and the row count M. `llmx build` times the candidates of
llmx.kernels.tuning for every (N, K) one rank launches, at each M bucket up to the one covering
max_num_tokens (no step has more rows), and stores the winners with the GPU's name in engine.json
`build.kernels["gemm_tiles"]`; the runtime installs them (tuning.load_engine_tiles) instead of re-tuning.
Where a GEMM hands decode rows to a decode kernel (w4a16 -> w4a16_mma_decode on Hopper with 16-bit activations,
else w4a16_gemv), tuning.bucket_kernels says which kernel, at which M, each bucket's entries are timed for.
bf16 and fp8 Linears run cuBLAS (F.linear, torch._scaled_mm): nothing to tune.

Timing takes tens of seconds, so winners are also kept per user in one JSON file per GPU model, triton
version and llmx version under $LLMX_CACHE_DIR/gemm-tiles (default ~/.cache/llmx/gemm-tiles): rebuilding
an engine, or building another one with the same shapes, reads them instead of timing again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmx.formats.checkpoint import llmx_version
from llmx.formats.shard import local_features
from llmx.common import env
from llmx.common.errors import LlmxError
from llmx.common.jsonio import dumps
from llmx.common.progress import Progress
from llmx.kernels import tuning
from llmx.formats.weights import UNQUANTIZED, method_for
from llmx.formats.presets import PRESETS
from llmx.formats.config import Mapping, ModelConfig, QuantConfig

if TYPE_CHECKING:
    from llmx.formats.weights import QuantMethod

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.

CACHE_FORMAT = "llmx-gemm-tile-cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class TuneReport:
    """What tuning did. `table` (the tuning.autotune table plus "device") is None when it was skipped,
    and `skipped` then says why; `warnings` are cache problems that did not stop it."""

    table: dict[str, Any] | None
    timed: int = 0  # entries (kernel, M bucket, N, K) timed on the GPU now
    cached: int = 0  # entries read from the per-user cache
    seconds: float = 0.0
    skipped: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def entries(self) -> int:
        return self.timed + self.cached

    def summary(self) -> dict[str, Any]:
        """The report without the table, for `llmx build --json`."""
        return {"timed": self.timed, "cached": self.cached, "entries": self.entries,
                "seconds": round(self.seconds, 3), "skipped": self.skipped, "warnings": list(self.warnings)}


# ---- shapes ------------------------------------------------------------------------------------------

def _layer_gemms(layer: int) -> list[tuple[str, ...]]:
    """The Linears of one layer as the runtime runs them: q|k|v and gate|up are fused into one GEMM each."""
    p = f"layers.{layer}"
    return [(f"{p}.attn.q_proj", f"{p}.attn.k_proj", f"{p}.attn.v_proj"), (f"{p}.attn.o_proj",),
            (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"), (f"{p}.mlp.down_proj",)]


def _rank_gemms(model: ModelConfig, quant: QuantConfig | None,
                mapping: Mapping) -> Iterator[tuple["QuantMethod", int, int]]:
    """(method, N, K) of every GEMM one rank runs; every tp rank holds equal slices, and every pipeline
    stage the same layer shapes, so one list serves all ranks."""
    for layer in range(model.num_layers):
        for modules in _layer_gemms(layer):
            # A fused Linear runs the method of its first part (build refuses groups of mixed formats).
            n = sum(local_features(m, model, mapping.tp)[0] for m in modules)
            k = local_features(modules[0], model, mapping.tp)[1]
            yield method_for(quant, modules[0]), n, k
    if not model.tie_word_embeddings:  # a tied head multiplies by the unquantized embedding
        n, k = local_features("lm_head", model, mapping.tp)
        yield method_for(quant, "lm_head"), n, k


def kernel_of(quant: QuantConfig | None, method: "QuantMethod") -> str | None:
    """The Triton GEMM (llmx.kernels.tuning's kernel name) a Linear stored by `method` launches on CUDA: its
    algorithm's `kernel` in llmx.formats.presets.PRESETS; None for cuBLAS (unquantized Linears, the fp8 formats),
    which has nothing to tune."""
    if quant is None or method is UNQUANTIZED:
        return None
    return PRESETS[quant.algo].kernel


def gemm_shapes(model: ModelConfig, quant: QuantConfig | None, mapping: Mapping) -> dict[str, list[tuple[int, int]]]:
    """kernel -> sorted distinct per-rank weight shapes (N out, K in) of its Triton GEMMs; {} when none.

    Fused q|k|v has N = (heads + 2 * kv heads per rank) * head_dim, row-parallel o_proj/down_proj split K,
    column-parallel gate|up split N (llmx.formats.shard decides every slice). Excluded modules run unquantized
    and are left out; lm_head counts only when its format is quantized.
    """
    found: dict[str, set[tuple[int, int]]] = {}
    for method, n, k in _rank_gemms(model, quant, mapping):
        kernel = kernel_of(quant, method)
        if kernel is not None:
            found.setdefault(kernel, set()).add((n, k))
    return {kernel: sorted(found[kernel]) for kernel in sorted(found)}


def int4_group_size(model: ModelConfig, quant: QuantConfig | None) -> int | None:
    """The group size of the grouped-int4 GEMMs (one per checkpoint), None when there are none."""
    for method, _, _ in _rank_gemms(model, quant, Mapping()):
        if kernel_of(quant, method) in tuning.GROUPED_KERNELS:
            return method.group_size
    return None


# Build-time tuning covers the decode buckets, where the weight-bandwidth-bound GEMMs are most sensitive
# to their tiles (the split of K, the width of N); prefill-size GEMMs are compute bound and keep the
# heuristic tiles, which would take most of the tuning time to improve on.
MAX_TUNED_M = 256


def m_buckets_for(max_num_tokens: int) -> tuple[int, ...]:
    """The decode M bucket edges a step of at most `max_num_tokens` rows can fall into (smallest first)."""
    top = min(tuning.m_bucket(max_num_tokens), MAX_TUNED_M)
    return tuple(edge for edge in tuning.M_BUCKETS if edge <= top)


# ---- the GPU -----------------------------------------------------------------------------------------

def gpu_description(device: Any = "cuda") -> dict[str, str]:
    """The GPU model, its compute capability and the triton version: what a tuned table is valid for."""
    import torch
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "triton": str(triton.__version__)}


def tuning_unavailable_reason() -> str | None:
    """Why tiles cannot be timed in this process (None when they can)."""
    import torch

    from llmx.kernels import _triton_util

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible, so GEMM tiles were not tuned; the runtime uses its default tiles"
    if not _triton_util.triton_available():
        return ("triton is not installed (pip install 'llmx[gpu]'), so GEMM tiles were not tuned; the runtime "
                "uses its default tiles")
    return None


# ---- the per-user cache ------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$LLMX_CACHE_DIR/gemm-tiles, else ~/.cache/llmx/gemm-tiles."""
    return env.LLMX_CACHE_DIR.read() / "gemm-tiles"


def _slug(text: str) -> str:
    """A file-name-safe form of a GPU name or version ("NVIDIA H100 80GB HBM3" -> "NVIDIA-H100-80GB-HBM3")."""
    return re.sub(r"[^A-Za-z0-9._+]+", "-", text).strip("-") or "unknown"


class TileCache:
    """Tuned configs of one GPU model + triton version + llmx version, kept in one JSON file:
    {"format", "version", "device", "entries": {case key: {shape key: TileConfig dict}}}.

    A file that cannot be read or parsed is ignored with a warning (and rewritten on the next store);
    a file that cannot be written leaves the tiles in engine.json only. Neither stops a build.
    """

    def __init__(self, path: Path, device: dict[str, str] | None = None):
        self.path = Path(path)
        self.device = device
        self.warnings: list[str] = []
        self._write_failed = False
        self.entries = self._load()

    @classmethod
    def for_device(cls, device: dict[str, str]) -> "TileCache":
        name = f"{_slug(device['name'])}-{_slug(device['triton'])}-{_slug(llmx_version())}.json"
        return cls(cache_dir() / name, device)

    def get(self, case: str, shape: str) -> dict[str, int] | None:
        return self.entries.get(case, {}).get(shape)

    def put(self, case: str, shape: str, config: dict[str, int]) -> None:
        """Remember one winner and write the file at once, so an interrupted build keeps what it timed."""
        self.entries.setdefault(case, {})[shape] = config
        self._save()

    def _load(self) -> dict[str, dict[str, dict[str, int]]]:
        try:
            return _parse_cache(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # no cache yet (or no folder for one: _save says so)
            return {}
        except OSError as exc:
            self.warnings.append(f"could not read the GEMM tile cache {self.path} ({exc}); tuning without it")
        except (ValueError, KeyError, TypeError, AttributeError, LlmxError) as exc:
            self.warnings.append(f"ignored the GEMM tile cache {self.path}, which is not a valid {CACHE_FORMAT} "
                                 f"file ({type(exc).__name__}: {exc}); its tiles are timed again and the file "
                                 f"rewritten")
        return {}

    def _save(self) -> None:
        if self._write_failed:
            return
        try:
            # Another build may have stored entries since we read the file: keep them, ours win.
            merged = _parse_cache(self.path.read_text())
        except (OSError, ValueError, KeyError, TypeError, AttributeError, LlmxError):
            merged = {}
        for case, shapes in self.entries.items():
            merged.setdefault(case, {}).update(shapes)
        self.entries = merged
        document = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "device": self.device, "entries": merged}
        try:
            _write_atomically(self.path, dumps(document, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            self._write_failed = True
            self.warnings.append(f"could not write the GEMM tile cache {self.path} ({exc}); the tuned tiles are "
                                 f"stored in engine.json only")


def _parse_cache(text: str) -> dict[str, dict[str, dict[str, int]]]:
    data = json.loads(text)
    if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
    entries = data["entries"]
    for shapes in entries.values():
        for config in shapes.values():
            tuning.TileConfig.from_dict(config)  # raises on a damaged entry
    return entries


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one (tmp file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def case_key(kernel: str, act_dtype: str, group_size: int | None) -> str:
    """Cache key of everything besides the shape that the timing depends on (e.g. "w4a16/bfloat16/g128")."""
    key = f"{kernel}/{act_dtype}"
    return f"{key}/g{group_size}" if kernel in tuning.GROUPED_KERNELS else key


# ---- tuning ------------------------------------------------------------------------------------------

def _default_case(kernel: str, act_dtype: str, group_size: int | None) -> Callable[..., Any]:
    """The kernel module's tuning case with the engine's activation dtype (and int4 group size): tiles
    timed in bf16 may not even fit shared memory in fp32."""
    import torch

    module, fn = tuning.TUNING_CASES[kernel]
    options: dict[str, Any] = {"dtype": getattr(torch, act_dtype)}
    if kernel in tuning.GROUPED_KERNELS:
        if group_size is None:
            raise LlmxError(f"tuning the {kernel} GEMM needs the checkpoint's int4 group size; pass group_size.")
        options["group_size"] = group_size
    return functools.partial(getattr(importlib.import_module(module), fn), **options)


def tune_engine_kernels(shapes: dict[str, list[tuple[int, int]]], max_num_tokens: int, device: Any = "cuda",
                        log: Callable[[str], None] | None = None, *, act_dtype: str = "bfloat16",
                        group_size: int | None = None, cache: TileCache | None = None,
                        device_info: dict[str, str] | None = None, progress: Progress | None = None,
                        make_case: Callable[..., Any] | None = None,
                        timer: Callable[[Callable[[], Any]], float] | None = None) -> TuneReport:
    """Tune every (kernel, N, K) of `shapes` at the M buckets up to the one covering `max_num_tokens`.

    Entries found in `cache` (default: this GPU's file under cache_dir()) are not timed again; the others
    go through tuning.autotune one at a time and are stored in the cache as soon as they are known. The
    returned table is tuning.merge_tables of them plus "device": gpu_description(). `make_case` and `timer`
    replace the kernel modules' tuning cases and triton's do_bench (tests drive the tuner without a GPU).
    """
    start = time.perf_counter()
    for kernel in shapes:
        if kernel not in tuning.TUNING_CASES:
            raise LlmxError(f"Unknown GEMM kernel {kernel!r} to tune; expected one of {sorted(tuning.TUNING_CASES)}.")
    info = device_info if device_info is not None else gpu_description(device)
    cache = cache if cache is not None else TileCache.for_device(info)
    # Which decode kernel the runtime will launch here (the tests' stand-in cases time none of them).
    mma_decode = make_case is None and _mma_decode_available(act_dtype, device)
    work = [(timed_kernel, n, k, m) for kernel in shapes for n, k in shapes[kernel]
            for bucket in m_buckets_for(max_num_tokens)
            for timed_kernel, m in tuning.bucket_kernels(kernel, bucket, k, group_size, mma_decode=mma_decode)]
    misses = sum(cache.get(case_key(kern, act_dtype, group_size), tuning.shape_key(m, n, k)) is None
                 for kern, n, k, m in work)
    timing = {} if timer is None else {"timer": timer}
    tables, timed = [], 0
    for kernel, n, k, m in work:
        case, shape = case_key(kernel, act_dtype, group_size), tuning.shape_key(m, n, k)
        config = cache.get(case, shape)
        if config is None:
            table = tuning.autotune(kernel, [(n, k)], [m], device=device, log=log,
                                    make_case=make_case or _default_case(kernel, act_dtype, group_size), **timing)
            config = table["kernels"][kernel][shape]
            cache.put(case, shape, config)
            timed += 1
            if progress is not None:
                progress("tune GEMM tiles", timed, misses)
        tables.append({"kernels": {kernel: {shape: config}}})
    table = tuning.merge_tables(*tables)
    table["device"] = dict(info)
    return TuneReport(table, timed=timed, cached=len(work) - timed, seconds=time.perf_counter() - start,
                      warnings=tuple(cache.warnings))


def _mma_decode_available(act_dtype: str, device: Any) -> bool:
    import torch

    from llmx.kernels.w4a16_mma_decode import mma_decode_available

    return mma_decode_available(getattr(torch, act_dtype), device)


def tune_for_engine(model: ModelConfig, quant: QuantConfig | None, act_dtype: str, mapping: Mapping,
                    max_num_tokens: int, *, progress: Progress | None = None) -> TuneReport:
    """What `llmx build` runs for a CUDA engine: tune its GEMM shapes, or say why that cannot happen here."""
    shapes = gemm_shapes(model, quant, mapping)
    if not shapes:
        return TuneReport(None, skipped="the engine has no Triton GEMMs to tune (its Linears run cuBLAS)")
    reason = tuning_unavailable_reason()
    if reason is not None:
        return TuneReport(None, skipped=reason)
    return tune_engine_kernels(shapes, max_num_tokens, "cuda", act_dtype=act_dtype,
                               group_size=int4_group_size(model, quant), progress=progress)

"""Tile configurations for the quantized GEMM kernels: defaults, the tuned table, and the autotuner.

A GEMM y[M, N] = x[M, K] @ W[N, K]^T is launched with a `TileConfig`. Which one is fastest depends on the
kernel, on the weight shape (N, K) and on M, and M changes every step (decode batches of 1..256 rows,
prefill chunks of thousands), so configurations are tuned per M bucket: a config tuned at M = bucket
serves every M whose `m_bucket(M)` is that bucket.

`autotune(...)` times every candidate on the GPU and returns a JSON-able table; `llmx build` (llmx.build.tune)
stores it in engine.json (`build.kernels["gemm_tiles"]`, with the GPU it was tuned on) and the runtime
hands it back through `load_engine_tiles(table, gpu_name)`, which installs it with `load_tuned(table)`.
Wrappers ask `gemm_config(kernel, M, N, K)`: the tuned entry when one exists, else a heuristic default.

This module imports nothing heavy at import time: the CPU runtime and `llmx --help` reach it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from llmx.common.errors import LlmxError

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

TABLE_FORMAT = "llmx-gemm-tiles"
TABLE_VERSION = 1

# Upper edges of the M buckets: decode batch sizes first, then prefill chunk sizes.
M_BUCKETS = (1, 16, 64, 256, 2048, 8192)

# kernel name -> (module, function building a timing case); see `autotune`.
TUNING_CASES = {
    "w4a16": ("llmx.kernels.w4a16_gemm", "w4a16_tuning_case"),
    "w4a16_gemv": ("llmx.kernels.w4a16_gemv", "w4a16_gemv_tuning_case"),
    "w4a16_mma_decode": ("llmx.kernels.w4a16_mma_decode", "w4a16_mma_decode_tuning_case"),
    "nvfp4": ("llmx.kernels.nvfp4_gemm", "nvfp4_tuning_case"),
    "int8": ("llmx.kernels.int8_gemm", "int8_tuning_case"),
    "int8_wo": ("llmx.kernels.int8_gemm", "int8_wo_tuning_case"),
    "w4a8": ("llmx.kernels.fp8_gemm", "w4a8_tuning_case"),
}

# Weight bits per element of each kernel: decides how wide a K tile the decode defaults stream.
_WEIGHT_BITS = {"w4a16": 4, "w4a16_gemv": 4, "w4a16_mma_decode": 4, "nvfp4": 4, "w4a8": 4, "int8": 8, "int8_wo": 8}
# Kernels reading int4 weights in groups: the group size decides their K tile, so their tuning cases take it and
# `llmx build`'s tile cache keys it.
GROUPED_KERNELS = ("w4a16", "w4a16_gemv", "w4a16_mma_decode", "w4a8")

# The W4A16 dispatch (`int4_kernel_for`) runs the CUDA-core GEMV (w4a16_gemv.py) for M <= GEMV_MAX_M rows when K
# and the group size are whole int32 words of 8 nibbles. The GEMV's tiles have their own table entries, under
# "w4a16_gemv": in the M = 1 bucket, and in the M = 16 bucket (timed at M = GEMV_MAX_M) beside the tensor-core
# kernel's entry, which then serves M = GEMV_MAX_M + 1..16.
GEMV_MAX_M = 4
# ... except that on Hopper the tensor-core decode kernel (w4a16_mma_decode.py) takes M = 2..64 rows of 16-bit
# activations where K and the group size are multiples of 128 (at M = 1 the GEMV is faster): its entries, under
# "w4a16_mma_decode", serve the M = 16 and M = 64 buckets. It pads the batch to 16, 32 or 64 rows and walks K
# tiles of MMA_BLOCK_K inputs that each lie in one quantization group.
MMA_DECODE_MIN_M = 2
MMA_KERNEL_MAX_M = 64
MMA_BLOCK_K = 128

_H100_SM_COUNT = 132


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. block_* are tile sizes (powers of two, >= 16); split_k > 1 splits the K
    loop over that many programs whose partial sums are added atomically in float32; group_m is the
    L2 swizzle width (tiles of group_m rows of output blocks are walked column by column)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise LlmxError(f"Tile config field {name}={value} must be a power of two >= 16; fix the "
                                f"tuned table or the config passed to the kernel.")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise LlmxError(f"Tile config {self} needs split_k, group_m and num_stages >= 1; fix the tuned "
                            f"table or the config passed to the kernel.")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise LlmxError(f"Tile config field num_warps={self.num_warps} must be 1, 2, 4, 8 or 16.")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TileConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown or not {"block_m", "block_n", "block_k"} <= set(d):
            raise LlmxError(f"Tile config {d} in engine.json build.kernels.gemm_tiles must have block_m, "
                            f"block_n, block_k and only {sorted(names)}; rebuild the engine.")
        return cls(**{k: int(v) for k, v in d.items()})

    def replace(self, **changes: int) -> "TileConfig":
        return dataclasses.replace(self, **changes)


def m_bucket(m: int) -> int:
    """The smallest bucket edge >= m (the largest edge for bigger M)."""
    if m < 1:
        raise LlmxError(f"GEMM row count M={m} must be >= 1.")
    for edge in M_BUCKETS:
        if m <= edge:
            return edge
    return M_BUCKETS[-1]


def shape_key(m: int, n: int, k: int) -> str:
    """Table key of a GEMM shape: its M bucket, N and K (e.g. "m16_n4096_k4096")."""
    return f"m{m_bucket(m)}_n{n}_k{k}"


def w4a16_uses_gemv(m: int, k: int, group_size: int) -> bool:
    """Whether the GEMV (w4a16_gemv.py) runs an [M, K] call with this group size."""
    return m <= GEMV_MAX_M and k % 8 == 0 and group_size % 8 == 0


def w4a16_mma_decode_fits(m: int, k: int, group_size: int) -> bool:
    """Whether the tensor-core decode kernel runs an [M, K] call with this group size (any dtype and GPU)."""
    return m <= MMA_KERNEL_MAX_M and k % MMA_BLOCK_K == 0 and group_size % MMA_BLOCK_K == 0


# The three W4A16 kernels, by their names here (table entries, tuning cases).
W4A16_TENSOR_CORE = "w4a16"
W4A16_GEMV = "w4a16_gemv"
W4A16_MMA_DECODE = "w4a16_mma_decode"
# The kernels with a gated variant (silu(gate) * up written directly, w4a16_gemv_gated.py).
W4A16_GATED = (W4A16_GEMV, W4A16_MMA_DECODE)


def int4_kernel_for(m: int, k: int, group_size: int, *, mma_decode: bool) -> str:
    """The one choice of the W4A16 kernel for x [M, K] times an int4 weight with this group size.

    `mma_decode`: whether the tensor-core decode kernel runs on the device for the activations
    (w4a16_mma_decode.mma_decode_available: Hopper, 16-bit activations, compiled kernels). It takes M = 2..64
    there where K and the group size are multiples of 128; else the CUDA-core GEMV takes M <= 4 where K and
    the group size are whole words of 8 nibbles; else the tensor-core GEMM. N does not enter the choice (the
    LM head's N = 128,256 is slower on the decode kernel at M = 48..64 and takes it anyway, w4a16_mma_decode.py).
    w4a16_dispatch.w4a16_matmul, the gated MLP (w4a16_gemv_gated.py) and the tuning table (`bucket_kernels`)
    all follow this function."""
    if mma_decode and m >= MMA_DECODE_MIN_M and w4a16_mma_decode_fits(m, k, group_size):
        return W4A16_MMA_DECODE
    if w4a16_uses_gemv(m, k, group_size):
        return W4A16_GEMV
    return W4A16_TENSOR_CORE


def bucket_kernels(kernel: str, bucket: int, k: int, group_size: int | None = None, *,
                   mma_decode: bool = False) -> list[tuple[str, int]]:
    """(kernel name, M to time) of each table entry serving `kernel`'s calls with M in bucket `bucket`: the
    kernel itself at M = bucket, except for w4a16, where `int4_kernel_for` picks the kernel of every M of the
    bucket (`mma_decode` as it takes it): each kernel it picks there, timed at the largest such M, in order of
    M (e.g. the GEMV at M = GEMV_MAX_M, then the tensor-core GEMM at 16, for the M = 16 bucket)."""
    if kernel != W4A16_TENSOR_CORE or group_size is None:
        return [(kernel, bucket)]
    lower = max((edge for edge in M_BUCKETS if edge < bucket), default=0)
    largest: dict[str, int] = {}  # kernel -> largest M of the bucket it runs; insertion order = smallest M
    for m in range(lower + 1, bucket + 1):
        largest[int4_kernel_for(m, k, group_size, mma_decode=mma_decode)] = m
    return list(largest.items())


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (the H100's 132 when there is none)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return _H100_SM_COUNT


@functools.lru_cache(maxsize=4096)
def default_config(kernel: str, m: int, n: int, k: int) -> TileConfig:
    """Heuristic tiles, used when no tuned entry exists.

    Small M (decode) is weight-bandwidth bound: long K tiles keep many weight bytes in flight per SM,
    N tiles narrow to 32 when 64-wide ones would leave SMs idle, and split-K (which costs a zero-fill,
    float32 atomics and a cast) is added only when even that leaves most SMs idle (small N, e.g. a
    tensor-parallel shard). Weight-only kernels compute out^T = W @ x^T, so their block_n is the
    tensor-core M side and block_m (the batch) may stay at 16.
    """
    if kernel not in _WEIGHT_BITS:
        raise LlmxError(f"Unknown GEMM kernel {kernel!r}; expected one of {sorted(_WEIGHT_BITS)}.")
    if kernel == "w4a16_gemv":
        return _gemv_default(n, k)
    if kernel == "w4a16_mma_decode":
        return _mma_decode_default(m, n, k)
    bits = _WEIGHT_BITS[kernel]
    if m <= 16:
        sms = sm_count()
        block_n = 64 if -(-n // 64) >= sms else 32
        cfg = TileConfig(16, block_n, 256 if bits == 4 else 128, num_warps=4, num_stages=4)
        tiles = -(-n // block_n)
        if 2 * tiles < sms:
            # Enough K iterations must remain per split for the pipeline to stream.
            max_split = max(1, k // (cfg.block_k * 4))
            cfg = cfg.replace(split_k=max(1, min(max_split, sms // tiles, 4)))
        return cfg
    if m <= 64:
        return TileConfig(max(16, _pow2_at_least(m)), 64, 128, num_warps=4, num_stages=4)
    if m <= 256:
        return TileConfig(64, 128, 64 if bits == 4 else 128, num_warps=4, num_stages=4)
    # Prefill: an int8 x int8 K tile of 128 takes the shared memory of a 16-bit tile of 64.
    return TileConfig(128, 128, 128 if kernel == "int8" else 64, num_warps=8, num_stages=3)


# The GEMV's (block_n, block_k, num_warps): each thread holds rows = block_n * block_k / (1024 * num_warps) rows
# of 4 words (a 16-byte load each), and converts its 4 words' activations once for all of those rows: 4 or 8
# rows keep that conversion a small share of the work (1 row: about a third) without spilling registers.
_GEMV_TILES = ((16, 1024, 4), (16, 512, 2), (32, 512, 4), (64, 256, 4),  # 4 rows per thread
               (16, 1024, 2), (32, 512, 2), (32, 1024, 4), (64, 512, 4))  # 8 rows per thread


def _gemv_default(n: int, k: int) -> TileConfig:
    """16-row tiles, so even N = 4096 makes 256 programs for 132 SMs; K tiles of up to 1024 inputs (512 weight
    bytes per row), 2 of them in flight per program (3 stages: the fastest of a sweep of tile configurations
    for all four Llama-3.1-8B shapes at M = 1, BENCHMARKS.md); split-K only when under half the SMs would have
    a tile."""
    block_k = max(16, min(1024, _pow2_at_least(k)))
    cfg = TileConfig(16, 16, block_k, num_warps=4, num_stages=3)
    tiles = -(-n // cfg.block_n)
    if 2 * tiles < sm_count():
        return cfg.replace(split_k=max(1, min(4, sm_count() // tiles, k // (2 * block_k))))
    return cfg


def _mma_decode_default(m: int, n: int, k: int) -> TileConfig:
    """w4a16_mma_decode.py: the batch padded to 16, 32 or 64 rows; 64-row weight tiles (128 when even those fill
    every SM twice); split-K until there are about 2 programs per SM, keeping at least 4 K tiles of 128 per
    program so the copy pipeline streams."""
    sms = sm_count()
    block_n = 128 if n >= 2 * 128 * sms else 64
    tiles = -(-n // block_n)
    split = 1
    k_tiles = k // MMA_BLOCK_K
    while split < 8 and tiles * split < 2 * sms and k_tiles % (2 * split) == 0 and k_tiles // (2 * split) >= 4:
        split *= 2
    return TileConfig(mma_block_m(m), block_n, MMA_BLOCK_K, split_k=split, num_warps=4, num_stages=4)


def mma_block_m(m: int) -> int:
    """The tensor-core decode kernel's M tile for m rows: m padded to 16, 32 or 64."""
    return min(MMA_KERNEL_MAX_M, max(16, _pow2_at_least(m)))


def candidate_configs(kernel: str, m: int) -> list[TileConfig]:
    """The configurations `autotune` times for one kernel at one M bucket (the default first)."""
    if kernel == "w4a16_mma_decode":
        return [TileConfig(mma_block_m(m), bn, MMA_BLOCK_K, split_k=split, num_warps=4, num_stages=stages)
                for bn in (64, 128) for split in (1, 2, 4, 8) for stages in (3, 4)]
    if kernel == "w4a16_gemv":
        # Each activation row adds a float32 accumulator per held word: 8 rows of 4 words spill at M > 2.
        tiles = [(bn, bk, warps) for bn, bk, warps in _GEMV_TILES if bn * bk // (1024 * warps) * min(m, 4) <= 16]
        return [TileConfig(16, bn, bk, split_k=split, num_warps=warps, num_stages=stages)
                for bn, bk, warps in tiles for split, stages in ((1, 4), (1, 3), (2, 4), (4, 4))]
    small = m <= 16
    cands: list[TileConfig] = []
    if small:
        for bn in (32, 64, 128):
            for bk in (128, 256, 512):
                for split in (1, 2, 4):
                    cands.append(TileConfig(16, bn, bk, split_k=split, num_warps=4, num_stages=4))
    elif m <= 64:
        for bm in (16, 32, 64):
            for bn in (64, 128):
                for bk in (64, 128, 256):
                    cands.append(TileConfig(bm, bn, bk, num_warps=4, num_stages=4))
    elif m <= 256:
        for bm in (64, 128):
            for bn in (64, 128, 256):
                for bk in (64, 128):
                    cands.append(TileConfig(bm, bn, bk, num_warps=4 if bm * bn <= 8192 else 8, num_stages=4))
    else:
        for bm, bn in ((128, 128), (128, 256), (256, 128), (64, 256)):
            for bk in (64, 128):
                for stages in (3, 4):
                    cands.append(TileConfig(bm, bn, bk, num_warps=8, num_stages=stages))
    return cands


# kernel -> shape key -> config; filled by load_tuned from engine.json.
_TUNED: dict[str, dict[str, TileConfig]] = {}


def load_tuned(table: dict[str, Any] | None) -> None:
    """Install a table produced by `autotune` (replacing any earlier one); None clears it."""
    _TUNED.clear()
    if table is None:
        return
    if table.get("format") != TABLE_FORMAT or table.get("version") != TABLE_VERSION:
        raise LlmxError(f"engine.json build.kernels.gemm_tiles is not a version-{TABLE_VERSION} "
                        f"{TABLE_FORMAT} table; rebuild the engine with this llmx.")
    for kernel, entries in table.get("kernels", {}).items():
        _TUNED[kernel] = {key: TileConfig.from_dict(cfg) for key, cfg in entries.items()}


_log = logging.getLogger(__name__)
# (GPU the table was tuned on, GPU here) pairs already warned about: the warning is printed once per process.
_WARNED_MISMATCH: set[tuple[str | None, str]] = set()


def load_engine_tiles(table: dict[str, Any] | None, device_name: str | None, *, warn: bool = True) -> bool:
    """Install engine.json's `build.kernels.gemm_tiles` for the GPU named `device_name`; True when installed.

    Tiles tuned on another GPU model are not installed (they may not even fit its shared memory, and
    they were timed for other SM counts and bandwidths): the defaults apply and, when `warn`, one line says
    so. `device_name` None (not running on a GPU) or no table clears any earlier table.
    """
    if table is None or device_name is None:
        load_tuned(None)
        return False
    tuned_on = (table.get("device") or {}).get("name")
    if tuned_on != device_name:
        load_tuned(None)
        if warn and (tuned_on, device_name) not in _WARNED_MISMATCH:
            _WARNED_MISMATCH.add((tuned_on, device_name))
            _log.warning(f"warning: the engine's GEMM tiles were tuned on {tuned_on or 'an unnamed GPU'}, not on "
                         f"this {device_name}; using default tiles (rebuild the engine on this GPU to tune them).")
        return False
    load_tuned(table)
    return True


def gemm_config(kernel: str, m: int, n: int, k: int, override: TileConfig | dict | None = None) -> TileConfig:
    """The config a wrapper launches with: `override`, else the tuned entry, else `default_config`."""
    if override is not None:
        return override if isinstance(override, TileConfig) else TileConfig.from_dict(override)
    tuned = _TUNED.get(kernel, {}).get(shape_key(m, n, k))
    return tuned if tuned is not None else default_config(kernel, m, n, k)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _bench_median_ms(fn: Callable[[], Any]) -> float:
    """GPU time of one launch, replayed from a CUDA graph: at decode sizes a kernel runs for less time
    than its Python launch takes, so timing launches from Python would rank configs by launch cost."""
    from llmx.kernels.gpu_timing import graph_time_ms

    return graph_time_ms(fn, calls=10, replays=5)[0]


def autotune(
    kernel: str,
    shapes: Iterable[tuple[int, int]],
    m_values: Iterable[int] = M_BUCKETS,
    *,
    device: str = "cuda",
    make_case: Callable[..., tuple[Callable[[TileConfig], Any], Callable[[Any], bool]]] | None = None,
    candidates: Callable[[str, int], list[TileConfig]] = candidate_configs,
    timer: Callable[[Callable[[], Any]], float] = _bench_median_ms,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every candidate config for each (M, N, K) and return the JSON-able table of the fastest.

    `make_case(m, n, k, device)` builds random inputs once and returns (run, check): run(config) launches
    the kernel and returns its output, check(output) says whether it matches the pure-torch reference.
    Defaults to the kernel module's `*_tuning_case` (TUNING_CASES). A candidate that fails to launch
    (e.g. needs more shared memory than the GPU has) or computes a wrong result is skipped.
    """
    if make_case is None:
        if kernel not in TUNING_CASES:
            raise LlmxError(f"Unknown GEMM kernel {kernel!r} to tune; expected one of {sorted(TUNING_CASES)}.")
        module, fn = TUNING_CASES[kernel]
        make_case = getattr(importlib.import_module(module), fn)
    entries: dict[str, dict[str, int]] = {}
    for n, k in shapes:
        for m in m_values:
            run, check = make_case(m, n, k, device)
            best: tuple[float, TileConfig] | None = None
            for cfg in candidates(kernel, m):
                try:
                    if not check(run(cfg)):
                        continue
                    ms = timer(lambda cfg=cfg: run(cfg))
                except Exception as exc:  # noqa: BLE001  (an unlaunchable candidate is just not a choice)
                    if log:
                        log(f"{kernel} m={m} n={n} k={k}: skipped {cfg.to_dict()}: {type(exc).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is None:
                raise LlmxError(f"No tile config of {kernel} ran correctly for M={m}, N={n}, K={k}; "
                                f"check the GPU and the triton install.")
            entries[shape_key(m, n, k)] = best[1].to_dict()
            if log:
                log(f"{kernel} m={m} n={n} k={k}: {best[0] * 1e3:.1f} us with {best[1].to_dict()}")
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "kernels": {kernel: entries}}


def merge_tables(*tables: dict[str, Any]) -> dict[str, Any]:
    """One table holding the kernels of several `autotune` results (later tables win on conflicts)."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for kernel, entries in table.get("kernels", {}).items():
            merged.setdefault(kernel, {}).update(entries)
    return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "kernels": merged}

"""`llmx build` tunes the Triton GEMM tiles of a CUDA engine and the runtime installs them (llmx.build.tune).

On CPU the GPU is simulated (torch.cuda patched to report an H100) and the tuner is driven by a fake
timer and timing case, so every step but the timing itself runs: shapes, M buckets, cache, engine.json,
the hash, the CLI. The shapes are checked against what the quantized methods actually launch, recorded
by wrapping the GEMM references the CPU path calls. One GPU test tunes for real (skipped without CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmx.build import tune as build_tune
from llmx.formats.checkpoint import (linear_modules, llmx_version, make_provenance, rank_file, read_checkpoint,
                                   write_checkpoint_meta)
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.engine_dir import ENGINE_FILE, read_engine
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files
from llmx.common.errors import LlmxError
from llmx.kernels import fp8_gemm, int8_gemm, nvfp4_gemm, tuning, w4a16_format
from llmx.kernels.tuning import TileConfig
from llmx.quant.export_llmx import pre_quant_scale_patterns
from llmx.formats.weights import UNQUANTIZED, method_for
from llmx.formats.config import BuildConfig, Mapping, QuantConfig

H100 = "NVIDIA H100 80GB HBM3"
# Buckets 1, 16, 64 and 256: a step never has more than 200 rows.
BUILD = BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=200, device="cuda")
BUCKETS = (1, 16, 64, 256)
QUANTS = {
    "int4_awq": QuantConfig(algo="int4_awq", group_size=32, exclude=("lm_head",),
                            extra={"pre_quant_scale_modules": pre_quant_scale_patterns("int4_awq")}),
    # down_proj excluded everywhere: its shape must drop out. pre_quant_scale on o_proj only.
    "int8_sq": QuantConfig(algo="int8_sq", exclude=("lm_head", "layers.*.mlp.down_proj"),
                           extra={"pre_quant_scale_modules": pre_quant_scale_patterns("int8_sq")}),
    # lm_head quantized too: it is launched with this rank's (padded) vocabulary slice.
    "int8_wo": QuantConfig(algo="int8_wo", exclude=()),
}
KERNEL_OF_ALGO = {"int4_awq": "w4a16", "int8_sq": "int8", "int8_wo": "int8_wo"}


def quantize_without_calibration(src: Path, out: Path, quant: QuantConfig) -> Path:
    """A checkpoint with exactly the tensors `llmx quantize` writes for `quant`, from each format's own
    quantize_weight (random weights need no calibration: only the shapes matter here)."""
    ckpt = read_checkpoint(src)
    linears = {m.name for m in linear_modules(ckpt.model)}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    with safe_open(str(rank_file(src, 0)), framework="pt") as f:
        for name in f.keys():
            module, _, suffix = name.rpartition(".")
            method = method_for(quant, module)
            tensor = f.get_tensor(name)
            if suffix != "weight" or module not in linears or method is UNQUANTIZED:
                tensors[name] = tensor
                continue
            k = tensor.shape[1]
            smooth = torch.rand(k, generator=gen) + 0.5 if "pre_quant_scale" in method.weight_specs(
                tensor.shape[0], k, ckpt.dtype) else None
            stored = method.quantize_weight(tensor.float(), ckpt.dtype, input_amax=torch.tensor(4.0),
                                            pre_quant_scale=smooth)
            tensors.update({f"{module}.{s}": t.contiguous() for s, t in stored.items()})
    out.mkdir(parents=True)
    save_file(tensors, str(rank_file(out, 0)))
    write_checkpoint_meta(out, ckpt.model, ckpt.dtype, quant, ckpt.mapping,
                          make_provenance(src, ckpt.provenance["source_hash"], note="test: uncalibrated"))
    copy_files(find_tokenizer_files(src, trust_remote_code=False), out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llama (hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, vocab 250) in bf16, quantized."""
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("tune-ckpts")
    bf16 = convert(make_tiny_hf_model("llama", root / "hf", vocab_size=250), root / "bf16", dtype="bfloat16")
    return {"bf16": bf16, **{algo: quantize_without_calibration(bf16, root / algo, q) for algo, q in QUANTS.items()}}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "user-cache"
    monkeypatch.setenv("LLMX_CACHE_DIR", str(path))
    return path


@pytest.fixture
def fake_gpu(monkeypatch, cache_dir):
    """Within `with fake_gpu():` torch reports an H100 (and nothing allocates on it)."""
    @contextlib.contextmanager
    def simulated(name: str = H100):
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
            m.setattr(torch.cuda, "get_device_name", lambda *a: name)
            yield

    return simulated


def cost(cfg: TileConfig) -> float:
    """The fake GPU's time for a config: fastest at block_n 64, block_k 128, no split-K, small tiles."""
    return (abs(cfg.block_n - 64) + abs(cfg.block_k - 128) + 10 * (cfg.split_k - 1) + cfg.block_m / 1000
            + cfg.num_stages / 1e4)


class FakeTimer:
    def __init__(self):
        self.calls = 0

    def make_case(self, m, n, k, device):
        assert device == "cuda"
        return (lambda cfg: cfg), (lambda out: True)

    def __call__(self, fn) -> float:
        self.calls += 1
        return cost(fn())


@pytest.fixture
def timer(monkeypatch):
    """Every tuning in the test goes through the fake timer and case instead of triton's do_bench."""
    fake = FakeTimer()
    monkeypatch.setattr(build_tune, "tune_engine_kernels",
                        functools.partial(build_tune.tune_engine_kernels, make_case=fake.make_case, timer=fake))
    return fake


def build_on_fake_gpu(fake_gpu, ckpt, out, build=BUILD, mapping=Mapping(), **kwargs):
    with fake_gpu():
        return build_engine(ckpt, out, build, mapping, **kwargs)


def winner(kernel: str, m: int) -> TileConfig:
    return min(tuning.candidate_configs(kernel, m), key=cost)


# ---- shapes ------------------------------------------------------------------------------------------

def stored_gemm_shapes(engine) -> dict[str, set[tuple[int, int]]]:
    """(N, K) of every quantized Linear read off the engine's rank files: int4 packs 2 inputs per byte."""
    kernel = KERNEL_OF_ALGO[engine.quant.algo]
    shapes: dict[str, set] = {}
    for rank in range(engine.mapping.world_size):
        with safe_open(str(engine.rank_path(rank)), framework="pt") as f:
            for name in f.keys():
                if name.endswith(".weight") and not name.startswith("embed"):
                    t = f.get_slice(name)
                    if t.get_dtype() in ("U8", "I8"):  # norms and unquantized Linears stay bf16
                        n, k = t.get_shape()
                        shapes.setdefault(kernel, set()).add((n, k * 2 if t.get_dtype() == "U8" else k))
    return shapes


def launched_gemm_shapes(engine, monkeypatch) -> dict[str, set[tuple[int, int]]]:
    """(N, K) each rank's quantized Linears pass to their GEMM when run (the CPU path calls the references)."""
    from llmx.runtime.distributed import ParallelContext
    from llmx.runtime.layers.embedding import LMHead
    from llmx.runtime.layers.linear import Linear
    from llmx.runtime.loader import load_rank_weights
    from llmx.runtime.models.registry import model_class

    launched: dict[str, set] = {}

    def recording(kernel, fn, weight_arg, x_arg):
        def wrapper(*args, **kwargs):
            launched.setdefault(kernel, set()).add((args[weight_arg].shape[0], args[x_arg].shape[1]))
            return fn(*args, **kwargs)
        return wrapper

    for module, name, kernel, w, x in ((w4a16_format, "w4a16_gemm_ref", "w4a16", 1, 0),
                                       (int8_gemm, "int8_gemm_ref", "int8", 2, 0),
                                       (int8_gemm, "int8_wo_gemm_ref", "int8_wo", 1, 0),
                                       (nvfp4_gemm, "nvfp4_gemm_ref", "nvfp4", 1, 0),
                                       (fp8_gemm, "w4a8_gemm_ref", "w4a8", 1, 0)):
        monkeypatch.setattr(module, name, recording(kernel, getattr(module, name), w, x))
    m = engine.mapping
    for rank in range(m.world_size):
        ctx = ParallelContext(tp_rank=m.tp_rank(rank), tp_size=m.tp, pp_rank=m.pp_rank(rank), pp_size=m.pp)
        model = model_class(engine.model.architecture)(engine.model, engine.quant, ctx, 64, "cpu")
        load_rank_weights(model, engine.rank_path(rank), torch.device("cpu"), engine.dtype)
        for layer in model.modules():
            if isinstance(layer, Linear) or (isinstance(layer, LMHead) and layer.tied_to is None):
                in_features = layer.in_features if isinstance(layer, Linear) else layer.hidden_size
                layer.method.apply(layer.tensors, torch.randn(3, in_features, dtype=torch.bfloat16), None)
    return launched


@pytest.mark.parametrize("algo, tp", [("int4_awq", 1), ("int4_awq", 2), ("int8_sq", 1), ("int8_sq", 2),
                                      ("int8_sq", 4), ("int8_wo", 2)])
def test_gemm_shapes_are_what_the_methods_launch(checkpoints, tmp_path, monkeypatch, algo, tp):
    engine = read_engine(build_engine(checkpoints[algo], tmp_path / "e", BuildConfig(max_num_tokens=64, device="cpu"),
                                      Mapping(tp=tp)).path)
    shapes = build_tune.gemm_shapes(engine.model, engine.quant, engine.mapping)
    as_sets = {kernel: set(s) for kernel, s in shapes.items()}
    assert as_sets == stored_gemm_shapes(engine) == launched_gemm_shapes(engine, monkeypatch)
    assert all(s == sorted(s) for s in shapes.values())
    # Spelled out for the tiny Llama: q|k|v, o_proj, gate|up, down_proj (and the 250-row head, 125 per rank).
    heads, kv_heads, inter = 64 // tp, 32 // min(tp, 2), 128 // tp
    expected = {"qkv": (heads + 2 * kv_heads, 64), "o": (64, heads), "gate_up": (2 * inter, 64), "down": (64, inter)}
    if algo == "int8_sq":
        del expected["down"]  # excluded
    if algo == "int8_wo":
        expected["lm_head"] = (125, 64)
    assert as_sets == {KERNEL_OF_ALGO[algo]: set(expected.values())}


def test_formats_without_triton_gemms_have_nothing_to_tune(checkpoints):
    ckpt = read_checkpoint(checkpoints["bf16"])
    assert build_tune.gemm_shapes(ckpt.model, None, Mapping()) == {}
    for algo in ("fp8", "fp8_pc_pt", "none"):
        assert build_tune.gemm_shapes(ckpt.model, QuantConfig(algo=algo, exclude=("lm_head",)), Mapping()) == {}
    # Every algorithm's kernel is a tunable one, or None: cuBLAS (the fp8 formats).
    from llmx.formats.presets import PRESETS

    kernels = {preset.kernel for preset in PRESETS.values()}
    assert {name for name, preset in PRESETS.items() if preset.kernel is None} == {"fp8", "fp8_pc_pt"}
    # Every tunable kernel is one an algorithm launches, or one such a kernel hands some row counts to.
    launched = {name for kernel in kernels - {None} for bucket in tuning.M_BUCKETS
                for mma_decode in (False, True)
                for name, _ in tuning.bucket_kernels(kernel, bucket, 4096, 128, mma_decode=mma_decode)}
    assert launched == set(tuning.TUNING_CASES)


def test_m_buckets_stop_at_the_bucket_covering_max_num_tokens_and_at_decode_sizes():
    assert build_tune.m_buckets_for(1) == (1,)
    assert build_tune.m_buckets_for(200) == BUCKETS
    decode = tuple(edge for edge in tuning.M_BUCKETS if edge <= build_tune.MAX_TUNED_M)
    assert build_tune.m_buckets_for(8192) == decode == (1, 16, 64, 256)
    assert build_tune.m_buckets_for(100_000) == decode


def test_real_tuning_cases_take_the_engine_dtype_and_group_size():
    """The cases a real build times are the kernel modules' own, built with the engine's activation dtype
    (and int4 group size); their inputs are made here on the CPU, nothing is launched."""
    for kernel, (module, fn) in tuning.TUNING_CASES.items():
        # The tensor-core decode kernel runs 16-bit activations and groups of 128 only.
        dtype, group, k = ("float16", 128, 256) if kernel == "w4a16_mma_decode" else ("float32", 32, 64)
        case = build_tune._default_case(kernel, dtype, group)
        assert case.func.__name__ == fn and case.keywords["dtype"] is getattr(torch, dtype)
        assert case.keywords.get("group_size") == (group if kernel in tuning.GROUPED_KERNELS else None)
        run, check = case(3, 64, k, "cpu")
        assert callable(run) and callable(check)
    with pytest.raises(LlmxError, match="group size"):
        build_tune._default_case("w4a16", "bfloat16", None)


# ---- build + runtime ---------------------------------------------------------------------------------

def test_build_stores_the_fastest_tiles_and_the_runtime_installs_them(checkpoints, tmp_path, fake_gpu, timer,
                                                                     monkeypatch, caplog):
    result = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "e", mapping=Mapping(tp=2))
    shapes = [(64, 64), (64, 32), (128, 64)]  # q|k|v and down_proj share (64, 64) at tp 2
    # Bucket 1 is the GEMV's; bucket 16 holds the GEMV's entry (timed at M = 4) and the tensor-core kernel's.
    timed = [("w4a16_gemv", 1), ("w4a16_gemv", 4), ("w4a16", 16), ("w4a16", 64), ("w4a16", 256)]
    assert [entry for bucket in BUCKETS for entry in tuning.bucket_kernels("w4a16", bucket, 64, 32)] == timed
    entries = len(shapes) * len(timed)
    assert result.tuning.timed == entries and result.tuning.cached == 0 and result.tuning.skipped is None
    assert timer.calls == sum(len(tuning.candidate_configs(kernel, m)) for kernel, m in timed) * len(shapes)

    engine = read_engine(result.path)
    table = engine.build.kernels["gemm_tiles"]
    assert json.loads((result.path / ENGINE_FILE).read_text())["build"]["kernels"]["gemm_tiles"] == table
    import triton

    assert table["device"] == {"name": H100, "compute_capability": "9.0", "triton": triton.__version__}
    assert table["kernels"]["w4a16"] == {tuning.shape_key(m, n, k): winner("w4a16", m).to_dict()
                                         for n, k in shapes for m in BUCKETS[1:]}
    assert table["kernels"]["w4a16_gemv"] == {tuning.shape_key(m, n, k): winner("w4a16_gemv", m).to_dict()
                                              for n, k in shapes for m in (1, 4)}
    assert winner("w4a16", 16) == TileConfig(16, 64, 128, split_k=1, num_warps=4, num_stages=4)
    assert winner("w4a16", 16) != tuning.default_config("w4a16", 16, 64, 64)
    assert winner("w4a16_gemv", 1) != tuning.default_config("w4a16_gemv", 1, 64, 64)

    # The runtime hands the table to load_engine_tiles when it builds the model runner ...
    from llmx.runtime.distributed import ParallelContext
    from llmx.runtime.model_runner import ModelRunner

    calls = []
    with monkeypatch.context() as m:
        m.setattr(tuning, "load_engine_tiles", lambda *a, **kw: calls.append((a, kw)))
        ModelRunner(model_config=engine.model, quant=engine.quant, build=engine.build, act_dtype=engine.dtype,
                    weights_path=engine.rank_path(0), device=torch.device("cpu"), ctx=ParallelContext(tp_size=2),
                    kv_cache_tokens=64)
    assert calls == [((table, None), {"warn": True})]  # on CPU no GPU name: the defaults stay

    # ... which installs it on the GPU it was tuned on, and refuses it with one warning on another.
    monkeypatch.setattr(tuning, "_WARNED_MISMATCH", set())
    try:
        assert tuning.load_engine_tiles(table, H100)
        for n, k in shapes:
            for m in (9, 64, 200):
                assert tuning.gemm_config("w4a16", m, n, k) == winner("w4a16", tuning.m_bucket(m))
            for m in (1, 3):
                assert tuning.gemm_config("w4a16_gemv", m, n, k) == winner("w4a16_gemv", 1 if m == 1 else 4)
        with caplog.at_level(logging.WARNING, logger=tuning.__name__):
            assert not tuning.load_engine_tiles(table, "NVIDIA H200")
        assert tuning.gemm_config("w4a16", 1, 64, 64) == tuning.default_config("w4a16", 1, 64, 64)
        (warning,) = [r.getMessage() for r in caplog.records if r.name == tuning.__name__]
        assert H100 in warning and "NVIDIA H200" in warning
    finally:
        tuning.load_tuned(None)


def test_cache_hit_does_not_time_again_and_is_keyed_by_dtype_and_group(checkpoints, tmp_path, fake_gpu, timer,
                                                                       cache_dir):
    first = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "a")
    calls = timer.calls
    cache_files = list((cache_dir / "gemm-tiles").iterdir())
    assert [p.name for p in cache_files] == [f"NVIDIA-H100-80GB-HBM3-{first.tuning.table['device']['triton']}-"
                                             f"{llmx_version()}.json"]
    # Another engine with the same shapes (another output, other batch settings): all from the cache.
    second = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "b",
                               build=BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=200, device="cuda"))
    assert timer.calls == calls
    # 4 shapes, 5 entries each (see test_build_stores_the_fastest_tiles_and_the_runtime_installs_them).
    assert (second.tuning.timed, second.tuning.cached) == (0, first.tuning.entries) and first.tuning.entries == 20
    assert second.tuning.table == first.tuning.table
    # A smaller max_num_tokens needs fewer buckets, all in the cache; a larger one adds no prefill bucket
    # (only decode sizes are tuned).
    third = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "c",
                              build=BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=16, device="cuda"))
    assert (third.tuning.timed, third.tuning.cached) == (0, 12)
    fourth = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "d",
                               build=BuildConfig(max_batch_size=4, max_seq_len=2048, max_num_tokens=2048, device="cuda"))
    assert (fourth.tuning.timed, fourth.tuning.cached) == (0, 20)
    assert timer.calls == calls
    # Same shapes, another group size or activation dtype: timed afresh.
    shapes = {"w4a16": [(64, 64)]}
    info = {"name": H100, "compute_capability": "9.0", "triton": "x"}
    cache = build_tune.TileCache(cache_files[0], info)
    other_group = build_tune.tune_engine_kernels(shapes, 1, act_dtype="bfloat16", group_size=64, cache=cache,
                                                 device_info=info)
    other_dtype = build_tune.tune_engine_kernels(shapes, 1, act_dtype="float32", group_size=32, cache=cache,
                                                 device_info=info)
    same = build_tune.tune_engine_kernels(shapes, 1, act_dtype="bfloat16", group_size=32, cache=cache,
                                          device_info=info)
    assert (other_group.timed, other_dtype.timed, same.timed, same.cached) == (1, 1, 0, 1)


@pytest.mark.parametrize("damage", ["not json {", '{"format": "llmx-gemm-tile-cache", "version": 1, "entries": '
                                    '{"w4a16/bfloat16/g32": {"m1_n64_k64": {"block_m": 3}}}}', '[1, 2]'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(checkpoints, tmp_path, fake_gpu, timer, damage):
    first = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "a")
    (path,) = (tmp_path / "user-cache" / "gemm-tiles").iterdir()
    path.write_text(damage)
    calls = timer.calls
    again = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "b")
    assert (again.tuning.timed, again.tuning.cached) == (first.tuning.entries, 0)
    assert timer.calls == 2 * calls
    (warning,) = again.tuning.warnings
    assert str(path) in warning and "ignored" in warning
    assert again.tuning.table == first.tuning.table
    cached = json.loads(path.read_text())["entries"]
    assert len(cached["w4a16/bfloat16/g32"]) + len(cached["w4a16_gemv/bfloat16/g32"]) == first.tuning.entries
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_unwritable_cache_only_warns(checkpoints, tmp_path, fake_gpu, timer, cache_dir):
    cache_dir.write_text("a file where the cache folder should be")
    result = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "e")
    assert result.tuning.timed == 20 and "gemm_tiles" in read_engine(result.path).build.kernels
    (warning,) = result.tuning.warnings
    assert "could not write the GEMM tile cache" in warning


def test_no_tune_leaves_no_table_and_the_flag_is_a_build_input(checkpoints, tmp_path, fake_gpu, timer):
    out = tmp_path / "e"
    plain = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], out, tune=False)
    assert plain.tuning is None and timer.calls == 0
    assert "gemm_tiles" not in read_engine(out).build.kernels
    assert build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], out, tune=False).reused
    tuned = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], out)
    assert not tuned.reused and "gemm_tiles" in read_engine(out).build.kernels
    hashes = {json.loads((out / ENGINE_FILE).read_text())["input_hash"]}
    assert build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], out).reused
    assert not build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], out, tune=False).reused
    hashes.add(json.loads((out / ENGINE_FILE).read_text())["input_hash"])
    assert len(hashes) == 2 and "gemm_tiles" not in read_engine(out).build.kernels


def test_cpu_builds_and_cublas_formats_never_tune(checkpoints, tmp_path, fake_gpu, timer):
    cpu = build_engine(checkpoints["int4_awq"], tmp_path / "cpu", BuildConfig(device="cpu"))
    bf16 = build_on_fake_gpu(fake_gpu, checkpoints["bf16"], tmp_path / "bf16")
    assert cpu.tuning is None and bf16.tuning is None and timer.calls == 0
    for result in (cpu, bf16):
        assert read_engine(result.path).build.kernels == {}


def test_without_triton_the_build_goes_on_with_a_note(checkpoints, tmp_path, fake_gpu, timer, monkeypatch):
    from llmx.kernels import _triton_util

    monkeypatch.setattr(_triton_util, "triton_available", lambda: False)
    result = build_on_fake_gpu(fake_gpu, checkpoints["int4_awq"], tmp_path / "e")
    assert result.tuning.table is None and "triton is not installed" in result.tuning.skipped
    assert "gemm_tiles" not in read_engine(result.path).build.kernels and timer.calls == 0


def test_cli_tunes_by_default_and_no_tune_skips(checkpoints, tmp_path, fake_gpu, timer, capsys):
    from llmx.cli.main import run_cli

    ckpt = str(checkpoints["int8_sq"])
    with fake_gpu():
        assert run_cli(["build", ckpt, "-o", str(tmp_path / "a"), "--device", "cuda", "--max-num-tokens", "16",
                        "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # int8_sq without down_proj: q|k|v (128, 64), o_proj (64, 64), gate|up (256, 64) at buckets 1 and 16.
    assert summary["tuning"] == {"timed": 6, "cached": 0, "entries": 6, "seconds": summary["tuning"]["seconds"],
                                 "skipped": None, "warnings": []}
    assert set(read_engine(tmp_path / "a").build.kernels["gemm_tiles"]["kernels"]["int8"]) == {
        tuning.shape_key(m, n, 64) for n in (64, 128, 256) for m in (1, 16)}
    with fake_gpu():
        assert run_cli(["build", ckpt, "-o", str(tmp_path / "b"), "--device", "cuda", "--max-num-tokens", "16"]) == 0
    assert "tuned GEMM tiles for 6 (kernel, M bucket, N, K) shapes: 0 timed now, 6 from the cache" in \
        capsys.readouterr().out
    with fake_gpu():
        assert run_cli(["build", ckpt, "-o", str(tmp_path / "c"), "--device", "cuda", "--no-tune", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tuning"] is None
    assert read_engine(tmp_path / "c").build.kernels == {}


# ---- on the GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tunes for real)")
def test_gpu_tuned_engine_generates_what_the_untuned_one_does(checkpoints, tmp_path, cache_dir):
    pytest.importorskip("triton")
    from llmx.runtime.engine import LLM
    from llmx.runtime.sequence import SamplingParams

    build = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=64, device="cuda")
    tuned = build_engine(checkpoints["int4_awq"], tmp_path / "tuned", build)
    table = read_engine(tuned.path).build.kernels["gemm_tiles"]
    shapes = [(128, 64), (64, 64), (256, 64), (64, 128)]
    assert table["device"]["name"] == torch.cuda.get_device_name()
    assert set(table["kernels"]["w4a16"]) == {tuning.shape_key(m, n, k) for n, k in shapes for m in (16, 64)}
    assert set(table["kernels"]["w4a16_gemv"]) == {tuning.shape_key(m, n, k) for n, k in shapes for m in (1, 4)}
    assert tuned.tuning.timed == 16 and tuned.tuning.cached == 0
    again = build_engine(checkpoints["int4_awq"], tmp_path / "again", build)
    assert (again.tuning.timed, again.tuning.cached) == (0, 16)
    plain = build_engine(checkpoints["int4_awq"], tmp_path / "plain", build, tune=False)
    assert "gemm_tiles" not in read_engine(plain.path).build.kernels

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (3, 21, 50)]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    outputs = {}
    for name, path in (("tuned", tuned.path), ("plain", plain.path)):
        llm = LLM(path, kv_cache_fraction=0.05)
        if name == "tuned":
            for kernel in ("w4a16", "w4a16_gemv"):
                for key, config in table["kernels"][kernel].items():
                    m, n, k = (int(part[1:]) for part in key.split("_"))
                    assert tuning.gemm_config(kernel, m, n, k) == TileConfig.from_dict(config)
        else:
            assert tuning.gemm_config("w4a16_gemv", 1, 64, 64) == tuning.default_config("w4a16_gemv", 1, 64, 64)
        outputs[name] = [o.output_token_ids for o in llm.generate(prompts, params)]
        del llm
        torch.cuda.empty_cache()
    assert outputs["tuned"] == outputs["plain"]
    tuning.load_tuned(None)

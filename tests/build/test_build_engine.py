"""`build_engine`: the engine layout of ARCHITECTURE.md, per-rank contents, reuse and rebuild, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors import safe_open

from llmx.formats.checkpoint import read_checkpoint
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.engine_dir import ENGINE_FILE, read_engine
from llmx.formats.shard import kv_head_start, kv_heads_per_rank, stage_layers, vocab_per_rank
from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_json
from llmx.formats.config import BuildConfig, Mapping

BUILD = BuildConfig(max_batch_size=4, max_seq_len=256, max_num_tokens=256)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Converted tiny checkpoints: qwen2 (q/k/v bias, tied) and qwen3 (q/k norm, head_dim 32) in float32."""
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("engine-ckpts")
    return {
        "qwen2": convert(make_tiny_hf_model("qwen2", root / "hf2", tie=True, vocab_size=250), root / "q2",
                         dtype="float32"),
        "qwen3": convert(make_tiny_hf_model("qwen3", root / "hf3"), root / "q3", dtype="float32"),
    }


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_tp1_engine_layout_matches_architecture_md(checkpoints, tmp_path):
    ckpt_dir = checkpoints["qwen3"]
    result = build_engine(ckpt_dir, tmp_path / "engine", BUILD)
    assert not result.reused and result.path == tmp_path / "engine"
    meta = json.loads((result.path / ENGINE_FILE).read_text())
    assert meta["format"] == "llmx-engine" and meta["schema_version"] == 1
    assert meta["checkpoint"] == json.loads((ckpt_dir / "llmx.json").read_text())
    assert meta["build"] == BUILD.to_dict() and meta["mapping"] == {"tp": 1, "pp": 1}
    assert meta["target"]["device"] == "cpu" and meta["target"]["compute_capability"] is None
    assert meta["target"]["backend"] == "torch"
    assert meta["versions"]["engine_format"] == 1 and meta["versions"]["llmx"] and meta["versions"]["torch"]
    assert meta["input_hash"].startswith("sha256:")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (result.path / name).exists()

    ck = _tensors(ckpt_dir / "rank0.safetensors")
    en = _tensors(result.path / "rank0.safetensors")
    for i in range(2):
        p = f"layers.{i}"
        assert torch.equal(en[f"{p}.attn.qkv_proj.weight"], torch.cat(
            [ck[f"{p}.attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(en[f"{p}.mlp.gate_up_proj.weight"], torch.cat(
            [ck[f"{p}.mlp.gate_proj.weight"], ck[f"{p}.mlp.up_proj.weight"]]))
        for same in ("attn.o_proj.weight", "mlp.down_proj.weight", "attn_norm.weight", "mlp_norm.weight",
                     "attn.q_norm.weight", "attn.k_norm.weight"):
            assert torch.equal(en[f"{p}.{same}"], ck[f"{p}.{same}"])
    fused = {n for n in ck if "_proj" in n and any(f".{x}_proj." in n for x in ("q", "k", "v", "gate", "up"))}
    assert set(en) == (set(ck) - fused) | {f"layers.{i}.{f}.weight" for i in range(2)
                                          for f in ("attn.qkv_proj", "mlp.gate_up_proj")}

    engine = read_engine(result.path)
    assert engine.model == read_checkpoint(ckpt_dir).model and engine.dtype == "float32"
    assert engine.build == BUILD and engine.mapping == Mapping() and engine.quant is None


@pytest.mark.parametrize("tp, pp", [(2, 1), (4, 1), (2, 2), (1, 2)])
def test_sharded_engine_ranks_hold_their_slices(checkpoints, tmp_path, tp, pp):
    ckpt_dir = checkpoints["qwen2"]
    model = read_checkpoint(ckpt_dir).model
    mapping = Mapping(tp=tp, pp=pp)
    result = build_engine(ckpt_dir, tmp_path / "engine", BUILD, mapping)
    assert json.loads((result.path / ENGINE_FILE).read_text())["layout"]["stage_layers"] == \
        [[s.start, s.stop] for s in (stage_layers(model.num_layers, pp, p) for p in range(pp))]
    ck = _tensors(ckpt_dir / "rank0.safetensors")
    hd, h = model.head_dim, model.num_heads // tp
    kvs = kv_heads_per_rank(model.num_kv_heads, tp)
    inter = model.intermediate_size // tp
    vr = vocab_per_rank(model.vocab_size, tp)
    for rank in range(tp * pp):
        tr, pr = mapping.tp_rank(rank), mapping.pp_rank(rank)
        en = _tensors(result.path / f"rank{rank}.safetensors")
        layers = stage_layers(model.num_layers, pp, pr)
        assert {int(n.split(".")[1]) for n in en if n.startswith("layers.")} == set(layers)
        # Tied head: every last-stage rank (and the first stage) holds its vocabulary slice of the embedding.
        assert "embed.weight" in en and "lm_head.weight" not in en
        padded = torch.cat([ck["embed.weight"], torch.zeros(vr * tp - model.vocab_size, model.hidden_size)])
        assert torch.equal(en["embed.weight"], padded[tr * vr:(tr + 1) * vr])
        assert ("final_norm.weight" in en) == (pr == pp - 1)
        kv0 = kv_head_start(model.num_kv_heads, tp, tr) * hd
        for i in layers:
            p = f"layers.{i}"
            for suffix in ("weight", "bias"):
                q = ck[f"{p}.attn.q_proj.{suffix}"][tr * h * hd:(tr + 1) * h * hd]
                k = ck[f"{p}.attn.k_proj.{suffix}"][kv0:kv0 + kvs * hd]
                v = ck[f"{p}.attn.v_proj.{suffix}"][kv0:kv0 + kvs * hd]
                assert torch.equal(en[f"{p}.attn.qkv_proj.{suffix}"], torch.cat([q, k, v])), (rank, p, suffix)
            assert torch.equal(en[f"{p}.attn.o_proj.weight"],
                               ck[f"{p}.attn.o_proj.weight"][:, tr * h * hd:(tr + 1) * h * hd])
            assert torch.equal(en[f"{p}.mlp.gate_up_proj.weight"], torch.cat(
                [ck[f"{p}.mlp.gate_proj.weight"][tr * inter:(tr + 1) * inter],
                 ck[f"{p}.mlp.up_proj.weight"][tr * inter:(tr + 1) * inter]]))
            assert torch.equal(en[f"{p}.mlp.down_proj.weight"],
                               ck[f"{p}.mlp.down_proj.weight"][:, tr * inter:(tr + 1) * inter])


@pytest.mark.parametrize("family, tp, pp", [("qwen3", 1, 1), ("qwen3", 4, 1), ("qwen2", 2, 2)])
def test_runtime_loader_consumes_every_rank_file(checkpoints, tmp_path, family, tp, pp):
    """The contract with llmx.runtime: each rank's model takes exactly the tensors of its rank file."""
    from llmx.runtime.distributed import ParallelContext
    from llmx.runtime.loader import load_rank_weights
    from llmx.runtime.models.registry import model_class

    mapping = Mapping(tp=tp, pp=pp)
    engine = read_engine(build_engine(checkpoints[family], tmp_path / "e", BUILD, mapping).path)
    for rank in range(mapping.world_size):
        ctx = ParallelContext(tp_rank=mapping.tp_rank(rank), tp_size=tp, pp_rank=mapping.pp_rank(rank), pp_size=pp)
        model = model_class(engine.model.architecture)(engine.model, engine.quant, ctx, 64, "cpu")
        load_rank_weights(model, engine.rank_path(rank), torch.device("cpu"), engine.dtype)


def test_unchanged_build_is_reused_fast_and_untouched(checkpoints, tmp_path):
    ckpt_dir = checkpoints["qwen3"]
    out = build_engine(ckpt_dir, tmp_path / "e", BUILD, Mapping(tp=2)).path
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.perf_counter()
    again = build_engine(ckpt_dir, out, BUILD, Mapping(tp=2))
    assert again.reused and time.perf_counter() - t0 < 0.5 and again.seconds < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_changed_inputs_rebuild(checkpoints, tmp_path):
    src = checkpoints["qwen3"]
    ckpt_dir = shutil.copytree(src, tmp_path / "ckpt")
    out = tmp_path / "e"
    first = build_engine(ckpt_dir, out, BUILD)
    hash0 = json.loads((out / ENGINE_FILE).read_text())["input_hash"]

    def rebuilt(**kw) -> bool:
        args = {"build": BUILD, "mapping": Mapping(), **kw}
        return not build_engine(ckpt_dir, out, args.pop("build"), args.pop("mapping"), **args).reused

    assert not first.reused
    assert rebuilt(build=BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256))
    assert rebuilt()  # back to BUILD: the options changed again
    assert not rebuilt()
    assert rebuilt(mapping=Mapping(tp=2))
    assert rebuilt()
    assert rebuilt(force=True)
    assert rebuilt(recipe="recipes/qwen3/cpu.yaml")
    assert not rebuilt(recipe="recipes/qwen3/cpu.yaml")
    assert rebuilt()

    # The checkpoint's weights changed (rewritten file: new mtime) -> rebuild.
    rank0 = ckpt_dir / "rank0.safetensors"
    st = rank0.stat()
    os.utime(rank0, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert rebuilt()
    # A rank file of the engine went missing or was truncated -> rebuild.
    (out / "rank0.safetensors").unlink()
    assert rebuilt()
    data = (out / "rank0.safetensors").read_bytes()
    (out / "rank0.safetensors").write_bytes(data[:-4])
    assert rebuilt()
    assert not rebuilt()
    assert json.loads((out / ENGINE_FILE).read_text())["input_hash"] != hash0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_input_hash_covers_the_llmx_version(checkpoints, tmp_path, monkeypatch):
    import llmx

    out = build_engine(checkpoints["qwen3"], tmp_path / "e", BUILD).path
    monkeypatch.setattr(llmx, "__version__", "999.0")
    assert not build_engine(checkpoints["qwen3"], out, BUILD).reused
    assert json.loads((out / ENGINE_FILE).read_text())["versions"]["llmx"] == "999.0"


def _fails(*needles, **kwargs):
    with pytest.raises(LlmxError) as info:
        build_engine(**kwargs)
    for n in needles:
        assert n in info.value.message, info.value.message
    return info.value.message


def test_bad_build_inputs_leave_no_output(checkpoints, tmp_path):
    ck = checkpoints["qwen3"]
    out = tmp_path / "e"
    _fails("tp 3 does not divide the 4 attention heads", ckpt_dir=ck, out=out, build=BUILD, mapping=Mapping(tp=3))
    _fails("pp 3 exceeds the model's 2 layers", ckpt_dir=ck, out=out, build=BUILD, mapping=Mapping(pp=3))
    _fails("no llmx.json", ckpt_dir=tmp_path, out=out, build=BUILD)
    _fails("--device 'tpu' is not supported", ckpt_dir=ck, out=out, build=BuildConfig(device="tpu"))
    _fails("`max_batch_size` must be an integer from 1 to 65,536, got 0", ckpt_dir=ck, out=out,
           build=BuildConfig(max_batch_size=0))
    _fails("`cuda_graph_batch_sizes` must hold sizes from 1 to max_batch_size 64, got 128", ckpt_dir=ck, out=out,
           build=BuildConfig(max_batch_size=64, cuda_graph_batch_sizes=(1, 128)))
    _fails("--kv-cache-dtype int8 needs calibrated KV scales", ckpt_dir=ck, out=out,
           build=BuildConfig(kv_cache_dtype="int8"))
    _fails("`kv_cache_dtype` 'fp4'", ckpt_dir=ck, out=out, build=BuildConfig(kv_cache_dtype="fp4"))
    _fails("would replace the input folder", ckpt_dir=ck, out=ck, build=BUILD, force=True)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".e.")] == []

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    _fails("--force", ckpt_dir=ck, out=precious, build=BUILD)
    assert (precious / "notes.txt").read_text() == "keep"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_build_without_gpu_is_refused(checkpoints, tmp_path):
    _fails("--device cuda was requested but no CUDA GPU is visible here; build with --device cpu",
           ckpt_dir=checkpoints["qwen3"], out=tmp_path / "e", build=BuildConfig(device="cuda"))
    assert not (tmp_path / "e").exists()


def test_cuda_build_records_the_gpu(checkpoints, tmp_path, monkeypatch):
    """With a (simulated) H100 the target names the GPU and its compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    out = build_engine(checkpoints["qwen3"], tmp_path / "e", BuildConfig(device="cuda")).path
    target = read_engine(out).target
    assert target == {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                      "backend": "torch"}
    # Another GPU model of the same architecture changes the input hash: tuned tiles differ per GPU.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert not build_engine(checkpoints["qwen3"], out, BuildConfig(device="cuda")).reused


def test_kv_cache_dtype_is_taken_from_a_quantized_checkpoint(checkpoints, tmp_path):
    """A checkpoint with calibrated fp8 KV scales: the build inherits fp8 and copies the scales to every rank."""
    from safetensors.torch import load_file, save_file

    ckpt_dir = shutil.copytree(checkpoints["qwen3"], tmp_path / "ckpt")
    meta = json.loads((ckpt_dir / "llmx.json").read_text())
    meta["quantization"] = {"algo": "none", "group_size": None, "kv_cache_dtype": "fp8", "exclude": [], "extra": {}}
    (ckpt_dir / "llmx.json").write_text(json.dumps(meta))
    weights = load_file(str(ckpt_dir / "rank0.safetensors"))
    for i in range(2):
        weights[f"layers.{i}.attn.k_scale"] = torch.tensor(0.5 + i)
        weights[f"layers.{i}.attn.v_scale"] = torch.tensor(0.25 + i)
    save_file(weights, str(ckpt_dir / "rank0.safetensors"))
    engine = read_engine(build_engine(ckpt_dir, tmp_path / "e", BUILD, Mapping(tp=2)).path)
    assert engine.build.kv_cache_dtype == "fp8"
    for r in range(2):
        t = _tensors(engine.rank_path(r))
        assert t["layers.1.attn.k_scale"].item() == 1.5 and t["layers.1.attn.v_scale"].shape == ()
    _fails("--kv-cache-dtype int8 differs from the fp8 KV-cache scales", ckpt_dir=ckpt_dir, out=tmp_path / "e2",
           build=BuildConfig(kv_cache_dtype="int8"))


def test_checkpoint_with_wrong_tensor_is_refused_before_writing(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt_dir = shutil.copytree(checkpoints["qwen3"], tmp_path / "ckpt")
    weights = load_file(str(ckpt_dir / "rank0.safetensors"))
    weights["layers.1.mlp.up_proj.weight"] = weights["layers.1.mlp.up_proj.weight"][:100]
    save_file(weights, str(ckpt_dir / "rank0.safetensors"))
    _fails("rank0.safetensors: tensor `layers.1.mlp.up_proj.weight` has shape (100, 64) float32, expected "
           "(128, 64) float32", ckpt_dir=ckpt_dir, out=tmp_path / "e", build=BUILD)
    assert not (tmp_path / "e").exists()


def test_engine_json_input_hash_is_independent_of_the_output_path(checkpoints, tmp_path):
    a = build_engine(checkpoints["qwen3"], tmp_path / "a", BUILD).path
    b = build_engine(checkpoints["qwen3"], tmp_path / "b", BUILD).path
    ha, hb = (json.loads((p / ENGINE_FILE).read_text())["input_hash"] for p in (a, b))
    assert ha == hb and ha != hash_json({})

"""read_engine's validation and check_engine_runnable's refusals (GPU architecture, world size, version)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.engine_dir import ENGINE_FILE, check_engine_runnable, read_engine
from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig, Mapping


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("engine-checks")
    ckpt = convert(make_tiny_hf_model("llama", root / "hf"), root / "ckpt")
    return ckpt, build_engine(ckpt, root / "engine", BuildConfig(max_seq_len=128), Mapping(tp=2)).path


def _edited(engine_dir, tmp_path, edit):
    copy = shutil.copytree(engine_dir, tmp_path / "engine")
    meta = json.loads((copy / ENGINE_FILE).read_text())
    edit(meta)
    (copy / ENGINE_FILE).write_text(json.dumps(meta))
    return copy


def _as_h100(meta):
    meta["target"] = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                      "backend": "torch"}


def _refusal(engine, **kwargs) -> str:
    with pytest.raises(LlmxError) as info:
        check_engine_runnable(engine, **kwargs)
    msg = info.value.message
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_cpu_engine_runs_on_cpu_with_its_world_size(built):
    engine = read_engine(built[1])
    check_engine_runnable(engine, device="cpu", world_size=2)
    check_engine_runnable(engine, device="cpu")


def test_world_size_mismatch(built):
    ckpt, path = built
    msg = _refusal(read_engine(path), device="cpu", world_size=1)
    assert msg == (f"{path} was built for 2 rank(s) (tp=2, pp=1) but 1 were launched; launch 2, or rebuild it "
                   f"with `llmx build {ckpt.resolve()} -o {path} --tp 1 --pp 1`.")


def test_incompatible_engine_format_version(built, tmp_path):
    path = _edited(built[1], tmp_path, lambda m: m["versions"].update(engine_format=0, llmx="0.0.1"))
    msg = _refusal(read_engine(path), device="cpu", world_size=2)
    assert "was built by llmx 0.0.1 in engine format 0" in msg and "reads format 1" in msg
    assert f"rebuild it with `llmx build {built[0].resolve()} -o {path}`" in msg


def test_cpu_engine_on_cuda_is_refused(built):
    msg = _refusal(read_engine(built[1]), device="cuda", world_size=2)
    assert "was built for the CPU" in msg and "--device cuda" in msg


def test_cuda_engine_on_cpu_or_without_gpu_is_refused(built, tmp_path, monkeypatch):
    engine = read_engine(_edited(built[1], tmp_path, _as_h100))
    msg = _refusal(engine, device="cpu", world_size=2)
    assert "built for compute capability 9.0 (NVIDIA H100 80GB HBM3)" in msg and "--device cpu" in msg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = _refusal(engine, device="cuda", world_size=2)
    assert "no GPU is visible here" in msg


def test_cuda_engine_on_another_gpu_architecture(built, tmp_path, monkeypatch):
    path = _edited(built[1], tmp_path, _as_h100)
    engine = read_engine(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    msg = _refusal(engine, device="cuda", world_size=2)
    assert msg == (f"{path} was built for compute capability 9.0 (NVIDIA H100 80GB HBM3) but this GPU is 8.0 "
                   f"(NVIDIA A100-SXM4-80GB); rebuild it here with `llmx build {built[0].resolve()} -o {path}`.")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    check_engine_runnable(engine, device="cuda", world_size=2)  # same architecture: fine


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format="llmx-checkpoint"), "is not an llmx engine description"),
    (lambda m: m.update(schema_version=7), "`schema_version` is 7 but this llmx reads 1"),
    (lambda m: m.pop("build"), "is malformed (field 'build' is missing)"),
    (lambda m: m["build"].update(max_batch=3), "unexpected keyword argument 'max_batch'"),
    (lambda m: m["checkpoint"].pop("model"), "is malformed (field 'model' is missing)"),
    (lambda m: m["target"].update(device="tpu"), "`target.device` is 'tpu'"),
    (lambda m: m["checkpoint"].update(dtype="int4"), "`checkpoint.dtype` is 'int4'"),
    (lambda m: m["checkpoint"]["model"].update(num_layers=-1),
     "`checkpoint.model.num_layers` must be an integer from 1 to 1,024, got -1"),
])
def test_malformed_engine_json(built, tmp_path, edit, message):
    path = _edited(built[1], tmp_path, edit)
    with pytest.raises(LlmxError) as info:
        read_engine(path)
    assert message in info.value.message and str(path) in info.value.message
    assert "llmx build" in info.value.message or "re-create" in info.value.message


def test_missing_engine(built, tmp_path):
    with pytest.raises(LlmxError, match="is not an engine directory; build one with `llmx build CKPT"):
        read_engine(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmxError, match="has no engine.json; run `llmx build CKPT -o"):
        read_engine(tmp_path / "empty")
    with pytest.raises(LlmxError, match=r"has no engine.json \(it is a checkpoint: build it\)"):
        read_engine(built[0])
    bad = _edited(built[1], tmp_path, lambda m: None)
    (bad / ENGINE_FILE).write_text("{truncated")
    with pytest.raises(LlmxError, match="engine.json is not valid JSON"):
        read_engine(bad)


@pytest.mark.parametrize("quantization, named", [
    ({"algo": "fp8", "kv_cache_dtype": None}, "--algo fp8"),
    ({"algo": "int8_wo", "kv_cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
])
def test_build_refuses_fp8_formats_on_a_gpu_without_fp8(built, tmp_path, monkeypatch, quantization, named):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(built[0], ckpt)
    meta = json.loads((ckpt / "llmx.json").read_text())
    meta["quantization"] = {**quantization, "group_size": None, "exclude": ["lm_head"], "extra": {}}
    (ckpt / "llmx.json").write_text(json.dumps(meta))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    build = BuildConfig(max_batch_size=2, max_seq_len=64, max_num_tokens=64, device="cuda")
    with pytest.raises(LlmxError, match=f"{named}, which needs FP8 support .* NVIDIA A100-SXM4-80GB is 8.0; re-quantize"):
        build_engine(ckpt, tmp_path / "engine", build)
    assert not (tmp_path / "engine").exists()

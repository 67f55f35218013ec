"""--export-format hf writes ModelOpt's unified HF checkpoint; hf_import reads it back into llmx tensors equal to
what `llmx quantize` writes directly (bit for bit where both take the same steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmx.formats.checkpoint import read_checkpoint, verify_checkpoint
from llmx.common.errors import LlmxError
from llmx.quant.api import quantize
from llmx.ingest.hf_import import import_checkpoint, is_modelopt_checkpoint
from llmx.formats.weights import method_for

from helpers.corpus import CORPUS

CALIB = dict(calib_size=8, calib_seq_len=64, batch_size=8, group_size=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers.tiny_models import make_tiny_hf_model

    from llmx.ingest.convert import convert

    root = tmp_path_factory.mktemp("interop")
    hf = make_tiny_hf_model("qwen2", root / "hf", dtype=torch.bfloat16)  # q/k/v biases travel too
    calib = root / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:30_000])
    return root, hf, convert(hf, root / "ckpt"), calib


def _round_trip(setup, algo, kv_cache_dtype=None):
    root, _, ckpt, calib = setup
    name = f"{algo}-{kv_cache_dtype}"
    direct, hf, imported = root / f"direct-{name}", root / f"hf-{name}", root / f"imported-{name}"
    quantize(ckpt, direct, algo=algo, kv_cache_dtype=kv_cache_dtype, calib_data=str(calib), **CALIB)
    quantize(ckpt, hf, algo=algo, kv_cache_dtype=kv_cache_dtype, calib_data=str(calib), export_format="hf", **CALIB)
    assert is_modelopt_checkpoint(hf) and (hf / "tokenizer.json").is_file()
    written = []
    import_checkpoint(hf, imported, progress=lambda stage, done, total: written.append((done, total)))
    verify_checkpoint(read_checkpoint(imported))
    assert written[-1][0] == written[0][1] == (imported / "rank0.safetensors").stat().st_size \
        - _header_bytes(imported / "rank0.safetensors")
    return direct, imported


def _header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _effective(qdir: Path, module: str, source: dict) -> torch.Tensor:
    ckpt = read_checkpoint(qdir)
    tensors = load_file(qdir / "rank0.safetensors")
    own = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
    w = method_for(ckpt.quant, module).dequantize_weight(own)
    if "pre_quant_scale" in own:
        w = w * own["pre_quant_scale"].float()
    layer, block, proj = module.split(".")[1:]
    if proj != "o_proj" and proj != "down_proj":
        norm = f"layers.{layer}.{'attn_norm' if block == 'attn' else 'mlp_norm'}.weight"
        w = w * (tensors[norm].float() / source[norm].float())
    return w


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype.itemsize == 1 \
        else torch.equal(a, b)


def test_nvfp4_round_trip_is_bit_exact(setup):
    direct, imported = _round_trip(setup, "nvfp4")
    a, b = load_file(direct / "rank0.safetensors"), load_file(imported / "rank0.safetensors")
    assert set(a) == set(b)
    for name in a:
        assert _same(a[name], b[name]), name


def test_fp8_round_trip(setup):
    """ModelOpt's HF export keeps one fp8 scale per Linear where llmx shares one per fused group (build would
    requantize them to the largest), and divides in bf16 where llmx divides in float32 (1-ulp differences)."""
    direct, imported = _round_trip(setup, "fp8", kv_cache_dtype="fp8")
    a, b = load_file(direct / "rank0.safetensors"), load_file(imported / "rank0.safetensors")
    assert set(a) == set(b)
    assert read_checkpoint(imported).quant.kv_cache_dtype == "fp8"
    source = load_file(setup[2] / "rank0.safetensors")
    for name in a:
        if name.endswith(("k_scale", "v_scale", "norm.weight", "bias")) or "o_proj.weight_scale" in name \
                or "down_proj.input_scale" in name:
            assert _same(a[name], b[name]), name
    for i in range(2):
        for p in ("attn.q_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            module = f"layers.{i}.{p}"
            x, y = _effective(direct, module, source), _effective(imported, module, source)
            # same scale: 1-ulp rounding flips only; shared group scale: two fp8 grids (~3% error each)
            bound = 0.03 if p in ("attn.o_proj", "mlp.down_proj") else 0.08
            assert (x - y).norm() / x.norm() < bound, module


@pytest.mark.parametrize("algo", ["int4_awq", "w4a8_awq", "int8_sq"])
def test_smoothed_formats_round_trip_to_the_same_weights(setup, algo):
    direct, imported = _round_trip(setup, algo)
    assert read_checkpoint(imported).quant.algo == algo
    source = load_file(setup[2] / "rank0.safetensors")
    bound = 0.02 if algo == "int8_sq" else 0.06
    for i in range(2):
        for module in (f"layers.{i}.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            a, b = _effective(direct, module, source), _effective(imported, module, source)
            assert (a - b).norm() / a.norm() < bound, module
    a, b = load_file(direct / "rank0.safetensors"), load_file(imported / "rank0.safetensors")
    assert torch.equal(a["layers.0.attn.q_proj.bias"], b["layers.0.attn.q_proj.bias"])
    if algo != "int8_sq":
        assert torch.equal(a["layers.1.mlp.down_proj.pre_quant_scale"], b["layers.1.mlp.down_proj.pre_quant_scale"])


def test_plain_hf_folder_is_not_a_modelopt_checkpoint(setup):
    assert not is_modelopt_checkpoint(setup[1])


def test_unsupported_modelopt_format_is_refused(setup, tmp_path):
    import shutil

    root = setup[0]
    hf = next(root.glob("hf-nvfp4-*"), None) or root / "missing"
    copy = tmp_path / "mxfp4"
    shutil.copytree(hf, copy)
    config = json.loads((copy / "hf_quant_config.json").read_text())
    config["quantization"]["quant_algo"] = "MXFP4"
    (copy / "hf_quant_config.json").write_text(json.dumps(config))
    with pytest.raises(LlmxError, match="quant_algo 'MXFP4' is not a format llmx runs"):
        import_checkpoint(copy, tmp_path / "out")


def test_quantizing_a_modelopt_folder_is_refused(setup):
    root = setup[0]
    hf = next(root.glob("hf-nvfp4-*"))
    with pytest.raises(LlmxError, match="already quantized \\(a ModelOpt checkpoint\\)"):
        quantize(hf, root / "requantized", algo="int8_wo")

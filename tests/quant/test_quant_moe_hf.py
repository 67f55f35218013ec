"""ModelOpt's unified HF export of a quantized mixture of experts (the experts stored per expert, under the hub's
names) imports through `llmx convert` and runs within the per-format bound of the bf16 engine; a KV-cache-only
quantization leaves the experts as they are."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from helpers.corpus import CORPUS
from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.quant.api import quantize
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM

BUILD = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=128, device="cpu")
FP8_KL = 0.06  # tests/quant/test_quant_api.py's bound for fp8


def _logprobs(ckpt, out, ids):
    with LLM(build_engine(ckpt, out, BUILD).path) as llm:
        return torch.log_softmax(llm.runner.prompt_logits(ids), dim=-1)


def test_modelopt_hf_export_of_experts_imports_and_runs(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:40_000])
    ckpt = convert(make_tiny_hf_model("qwen3_moe", tmp_path / "hf", dtype=torch.bfloat16), tmp_path / "ckpt",
                   dtype="bfloat16")
    exported = quantize(ckpt, tmp_path / "hf-fp8", algo="fp8", calib_data=str(calib), calib_size=16,
                        calib_seq_len=64, batch_size=8, export_format="hf").path
    imported = convert(exported, tmp_path / "imported", dtype="bfloat16")
    tensors = load_file(imported / "rank0.safetensors")
    assert tensors["layers.2.mlp.experts.7.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["layers.2.mlp.router.weight"].dtype == torch.bfloat16
    ids = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    base, logprobs = _logprobs(ckpt, tmp_path / "e-base", ids), _logprobs(imported, tmp_path / "e-imported", ids)
    assert 0 < (base.exp() * (base - logprobs)).sum(-1).mean().item() < FP8_KL


def test_kv_cache_only_quantization_of_a_mixture_of_experts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:20_000])
    ckpt = convert(make_tiny_hf_model("mixtral", tmp_path / "hf", dtype=torch.bfloat16), tmp_path / "ckpt",
                   dtype="bfloat16")
    out = quantize(ckpt, tmp_path / "kv", algo="none", kv_cache_dtype="fp8", calib_data=str(calib), calib_size=8,
                   calib_seq_len=64).path
    tensors, source = load_file(out / "rank0.safetensors"), load_file(ckpt / "rank0.safetensors")
    assert tensors["layers.1.attn.k_scale"].dtype == torch.float32
    expert = "layers.1.mlp.experts.3.up_proj.weight"
    assert torch.equal(tensors[expert], source[expert])
    ids = list(range(3, 40))
    base, logprobs = _logprobs(ckpt, tmp_path / "e-base", ids), _logprobs(out, tmp_path / "e-kv", ids)
    assert (base.exp() * (base - logprobs)).sum(-1).mean().item() < FP8_KL

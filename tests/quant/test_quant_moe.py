"""Quantizing mixtures of experts through ModelOpt (quant/moe.py): FP8 per tensor and per channel, int8 and int4
weight-only and NVFP4 for every expert Linear, the router left in the checkpoint dtype; the engines stay within the dense
tests' per-format KL bounds of the bf16 engine; the summary counts, per sparse layer, the experts calibration
never reached."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers.corpus import CORPUS
from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.cli.quantize import quantize_summary
from llmx.build.engine import build_engine
from llmx.common.errors import LlmxError
from llmx.quant.api import quantize
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM

BUILD = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=128, device="cpu")
# KL(bf16 engine || quantized engine) per token, the bounds tests/quant/test_quant_api.py holds dense models to.
RUNTIME_KL = {"fp8": 0.06, "fp8_pc_pt": 0.06, "int8_wo": 0.005, "int4_wo": 0.2, "nvfp4": 0.2}
EXPERT_DTYPE = {"fp8": torch.float8_e4m3fn, "fp8_pc_pt": torch.float8_e4m3fn, "int8_wo": torch.int8,
                "int4_wo": torch.uint8, "nvfp4": torch.uint8}
# Every format on Qwen3-MoE; Qwen2-MoE (shared expert, q/k/v bias) in one per-tensor and one grouped format.
CASES = [("qwen3_moe", algo) for algo in RUNTIME_KL] + [("qwen2_moe", "fp8"), ("qwen2_moe", "int4_wo")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe-quant")
    calib = tmp / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:40_000])
    ckpts = {f: convert(make_tiny_hf_model(f, tmp / f"hf-{f}", dtype=torch.bfloat16), tmp / f"ckpt-{f}",
                        dtype="bfloat16") for f in ("qwen3_moe", "qwen2_moe")}
    ids = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(3)).tolist()
    base = {f: _logprobs(ckpt, tmp / f"e-{f}", ids) for f, ckpt in ckpts.items()}
    return tmp, calib, ckpts, ids, base


def _logprobs(ckpt, out, ids):
    with LLM(build_engine(ckpt, out, BUILD).path) as llm:
        return torch.log_softmax(llm.runner.prompt_logits(ids), dim=-1)


@pytest.mark.parametrize("family,algo", CASES)
def test_every_expert_format_runs_close_to_bf16(setup, family, algo):
    tmp, calib, ckpts, ids, base = setup
    ckpt = ckpts[family]
    source = load_file(ckpt / "rank0.safetensors")
    result = quantize(ckpt, tmp / f"{family}-{algo}", algo=algo, calib_data=str(calib), calib_size=16,
                      calib_seq_len=64, batch_size=8, group_size=16 if algo in ("int4_wo", "nvfp4") else None)
    tensors = load_file(result.path / "rank0.safetensors")
    sparse = 1 if family == "qwen2_moe" else 2
    assert tensors[f"layers.{sparse}.mlp.experts.3.down_proj.weight"].dtype == EXPERT_DTYPE[algo]
    assert torch.equal(tensors[f"layers.{sparse}.mlp.router.weight"], source[f"layers.{sparse}.mlp.router.weight"])
    assert set(result.experts_without_tokens) == set(range(3)) - ({1} if family == "qwen3_moe" else {0, 2})
    logprobs = _logprobs(result.path, tmp / f"e-{family}-{algo}", ids)
    kl = (base[family].exp() * (base[family] - logprobs)).sum(-1).mean().item()
    assert 0 < kl < RUNTIME_KL[algo], kl  # quantized (not 0), within the dense bound

def test_experts_calibration_never_reached_are_counted_and_named(setup):
    tmp, calib, ckpts, _, _ = setup
    result = quantize(ckpts["qwen3_moe"], tmp / "few", algo="fp8", calib_data=str(calib), calib_size=1,
                      calib_seq_len=2, batch_size=1)
    unseen = result.experts_without_tokens
    assert unseen and all(0 < n <= 8 for n in unseen.values()), unseen  # 2 tokens x top-3 reach at most 6 of 8
    lines = [w for w in result.warnings if "saw no calibration tokens" in w]
    assert len(lines) == len(unseen) and "from their weights alone" in lines[0]
    summary = quantize_summary(result)  # `llmx quantize --json`
    assert summary["experts_without_calibration_tokens"] == {str(k): v for k, v in unseen.items()}


def test_smoothing_algorithms_are_refused_for_experts(setup):
    tmp, calib, ckpts, _, _ = setup
    with pytest.raises(LlmxError, match="--algo int4_awq is not supported for the mixture of experts"):
        quantize(ckpts["qwen3_moe"], tmp / "awq", algo="int4_awq", calib_data=str(calib), calib_size=2)


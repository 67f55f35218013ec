"""fp8 experts take the fused path (runtime/models/moe.py stacks them for ops.fused_moe_fp8, so a CUDA graph can
hold the layer) and compute what the experts run one by one through their fp8 Linears compute."""

from __future__ import annotations

import torch

from helpers.corpus import CORPUS
from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.quant.api import quantize
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.models.moe import SparseMoE

BUILD = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=128, device="cpu")


def test_fp8_experts_fused_equal_one_by_one(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:20_000])
    ckpt = convert(make_tiny_hf_model("qwen3_moe", tmp_path / "hf", dtype=torch.bfloat16), tmp_path / "ckpt",
                   dtype="bfloat16")
    fp8 = quantize(ckpt, tmp_path / "fp8", algo="fp8", calib_data=str(calib), calib_size=8, calib_seq_len=64).path
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    with LLM(build_engine(fp8, tmp_path / "engine", BUILD).path) as llm:
        blocks = [m for m in llm.runner.model.modules() if isinstance(m, SparseMoE)]
        assert len(blocks) == 2 and all(b.fp8_scales is not None and b.capturable for b in blocks)
        fused = llm.runner.prompt_logits(ids)
        for block in blocks:
            block.w13 = block.w2 = block.fp8_scales = None  # each expert through its own fp8 Linear
        one_by_one = llm.runner.prompt_logits(ids)
    # The same fp8 products (quantize gives a layer's experts one input scale), summed in float32 in another order.
    assert (fused - one_by_one).abs().max().item() <= 1e-5 * one_by_one.abs().max().item()

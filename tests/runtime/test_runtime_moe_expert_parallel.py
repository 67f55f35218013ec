"""Expert parallelism over gloo (Mapping.ep = tp = 2): each rank holds half of the experts whole and runs only the
(token, expert) pairs routed to them; the logits and greedy tokens equal one rank's, for Mixtral, Qwen3-MoE (dense
and sparse layers) and Qwen2-MoE (its shared expert stays split by tp)."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from helpers.tiny_models import MOE_FAMILIES, make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=4, device="cpu")
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 33, 7, 71], list(range(10, 50))]
EXPERTS = {"mixtral": 4, "qwen3_moe": 8, "qwen2_moe": 6}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_parallel_equals_one_rank(family, tmp_path):
    ckpt = convert(make_tiny_hf_model(family, tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    ids = list(range(3, 50))
    results = []
    for name, layout in (("one", Mapping()), ("ep2", Mapping(tp=2, ep=2))):
        engine = build_engine(ckpt, tmp_path / name, BUILD, layout).path
        with LLM(engine, kv_cache_tokens=512) as llm:
            results.append((llm.runner.prompt_logits(ids), [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]))
    (logits1, tokens1), (logits2, tokens2) = results
    assert (logits2 - logits1).abs().max().item() <= 1e-4, family
    assert tokens2 == tokens1
    half = EXPERTS[family] // 2
    for rank in range(2):  # whole experts, rank r the r-th half
        with safe_open(str(tmp_path / "ep2" / f"rank{rank}.safetensors"), "pt") as f:
            experts = {int(k.split(".")[4]) for k in f.keys() if ".mlp.experts." in k}
            gate_up = next(k for k in f.keys() if ".mlp.experts." in k and k.endswith("gate_up_proj.weight"))
            assert experts == set(range(rank * half, (rank + 1) * half))
            assert f.get_slice(gate_up).get_shape()[0] == 2 * (128 if family == "mixtral" else 32)


def test_fp8_experts_under_expert_parallelism(tmp_path):
    """fp8 experts stacked per rank (the fused fp8 path) give one rank's distribution; bf16 partial sums are
    all-reduced, so the comparison is by KL rather than exact logits."""
    import torch

    from helpers.corpus import CORPUS
    from llmx.quant.api import quantize

    calib = tmp_path / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:20_000])
    ckpt = convert(make_tiny_hf_model("qwen3_moe", tmp_path / "hf", dtype=torch.bfloat16), tmp_path / "ckpt",
                   dtype="bfloat16")
    fp8 = quantize(ckpt, tmp_path / "fp8", algo="fp8", calib_data=str(calib), calib_size=8, calib_seq_len=64).path
    ids = list(range(3, 50))
    logprobs = []
    for name, layout in (("one", Mapping()), ("ep2", Mapping(tp=2, ep=2))):
        with LLM(build_engine(fp8, tmp_path / name, BUILD, layout).path, kv_cache_tokens=512) as llm:
            logprobs.append(torch.log_softmax(llm.runner.prompt_logits(ids), dim=-1))
    one, ep2 = logprobs
    assert (one.exp() * (one - ep2)).sum(-1).mean().item() < 1e-3

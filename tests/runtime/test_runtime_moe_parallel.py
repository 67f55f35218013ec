"""Tensor parallelism for mixtures of experts over gloo: each expert's intermediate dimension split over two
ranks (the router replicated, one all-reduce per sparse layer) gives the logits and greedy tokens of one rank, for
Mixtral, Qwen3-MoE (dense and sparse layers) and Qwen2-MoE (a gated shared expert)."""

from __future__ import annotations

import pytest

from helpers.tiny_models import MOE_FAMILIES, make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=4, device="cpu")
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 33, 7, 71], list(range(10, 50)), [101] * 3]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_tensor_parallel_equals_one_rank(family, tmp_path):
    ckpt = convert(make_tiny_hf_model(family, tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    ids = list(range(3, 60))
    results = []
    for name, layout in (("tp1", Mapping()), ("tp2", Mapping(tp=2))):
        with LLM(build_engine(ckpt, tmp_path / name, BUILD, layout).path, kv_cache_tokens=512) as llm:
            results.append((llm.runner.prompt_logits(ids), [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]))
    (logits1, tokens1), (logits2, tokens2) = results
    assert (logits2 - logits1).abs().max().item() <= 1e-4, family
    assert tokens2 == tokens1

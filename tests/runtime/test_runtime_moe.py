"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE) through convert, build and the runtime, against
transformers: fp32 logits within 1e-4 and identical greedy tokens; a batch equals each sequence alone (tensor
parallelism: test_runtime_moe_parallel.py).

The tiny models (tests/helpers/tiny_models.py) mix dense and sparse layers (Qwen3-MoE's `mlp_only_layers`,
Qwen2-MoE's `decoder_sparse_step`), renormalised and raw top-k weights, and Qwen2-MoE's gated shared expert.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.tiny_models import MOE_FAMILIES, make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=4, device="cpu")
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 33, 7, 71], list(range(10, 50)), [101] * 3, list(range(200, 221))]


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def tiny(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf_model(request.param, tmp / "hf", dtype=torch.float32)
    ckpt = convert(hf_dir, tmp / "ckpt", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return request.param, hf, ckpt, tmp


def _engine(ckpt, path, mapping=None):
    return build_engine(ckpt, path, BUILD, mapping or Mapping()).path


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_logits_greedy_tokens_and_batching_match_transformers(tiny):
    family, hf, ckpt, tmp = tiny
    ids = torch.randint(3, hf.config.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    with LLM(_engine(ckpt, tmp / "engine"), kv_cache_tokens=512) as llm:
        got = llm.runner.prompt_logits(ids)
        together = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
        alone = [llm.generate([p], GREEDY)[0].output_token_ids for p in PROMPTS]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4, family
    assert together == alone
    assert together[:2] == [_hf_greedy(hf, p, GREEDY.max_new_tokens) for p in PROMPTS[:2]]



def test_only_stacked_experts_are_capturable(tiny):
    """The fused path (stacked unquantized experts) can sit in a CUDA graph; experts run one by one cannot."""
    from llmx.runtime.models.moe import SparseMoE

    family, _, ckpt, tmp = tiny
    with LLM(_engine(ckpt, tmp / "capturable"), kv_cache_tokens=512) as llm:
        blocks = [m for m in llm.runner.model.modules() if isinstance(m, SparseMoE)]
        assert blocks and all(b.capturable for b in blocks)
        blocks[0].w13 = None
        assert not blocks[0].capturable

"""Gemma 2, Gemma 3, Phi-3 and dynamic NTK RoPE through the engine: what a batch computes equals what each
sequence computes alone (sliding and global layers, soft-caps, per-sequence LongRoPE / dynamic frequencies),
Gemma's sliding windows survive chunked prefill, and tensor / pipeline parallel layouts on gloo equal one rank.

LongRoPE and dynamic NTK rotate each step's tokens by the sequence's length at that step, so a prompt that
crosses the original context and is prefilled in chunks rotates its first chunk as the shorter sequence it
was then; their chunked runs are not expected to equal one-step prefill and are not tested for it."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

FAMILIES = ("gemma2", "gemma3", "phi3", "llama_dynamic")
BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=4, device="cpu")
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
PROMPTS = [[5, 9, 33, 7, 71], list(range(10, 50)), [101] * 3, list(range(200, 221))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        tmp = tmp_path_factory.mktemp(family)
        out[family] = convert(make_tiny_hf_model(family, tmp / "hf"), tmp / "ckpt", dtype="float32")
    return out


def _engine(ckpt, path, mapping=None, **build):
    options = {**BUILD.to_dict(), **build}
    return build_engine(ckpt, path, BuildConfig.from_dict(options), mapping or Mapping()).path


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sequence_alone(checkpoints, family, tmp_path):
    with LLM(_engine(checkpoints[family], tmp_path / "engine"), kv_cache_tokens=512) as llm:
        together = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
        alone = [llm.generate([p], GREEDY)[0].output_token_ids for p in PROMPTS]
        # Logits of a prompt scored alone equal its logits scored after the engine served the batch.
        first = llm.runner.prompt_logits(PROMPTS[1])
    assert together == alone
    with LLM(_engine(checkpoints[family], tmp_path / "fresh"), kv_cache_tokens=512) as llm:
        assert (llm.runner.prompt_logits(PROMPTS[1]) - first).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chunked_prefill_equals_one_step(checkpoints, family, tmp_path):
    """A 24-token step budget splits the 40-token prompt across sliding windows of 8 tokens."""
    with LLM(_engine(checkpoints[family], tmp_path / "whole"), kv_cache_tokens=512) as llm:
        whole = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(_engine(checkpoints[family], tmp_path / "chunked", max_num_tokens=24), kv_cache_tokens=512) as llm:
        chunked = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert chunked == whole


LAYOUTS = [("gemma2", Mapping(tp=2)), ("gemma3", Mapping(tp=2)), ("gemma3", Mapping(pp=2)), ("phi3", Mapping(tp=2))]


@pytest.mark.parametrize("family,mapping", LAYOUTS, ids=lambda v: v if isinstance(v, str) else f"tp{v.tp}pp{v.pp}")
def test_parallel_layout_equals_one_rank(checkpoints, family, mapping, tmp_path):
    ids = list(range(3, 60))
    results = []
    for name, layout in (("one", Mapping()), ("many", mapping)):
        with LLM(_engine(checkpoints[family], tmp_path / name, layout), kv_cache_tokens=512) as llm:
            results.append((llm.runner.prompt_logits(ids), [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]))
    (logits1, tokens1), (logits, tokens) = results
    assert (logits - logits1).abs().max().item() <= 1e-4
    assert tokens == tokens1

"""Tensor and pipeline parallelism on CPU: llmx starts the ranks itself (gloo) and they must compute
what one rank computes."""

from __future__ import annotations

import os
import time

import pytest
import torch

from helpers.tiny_models import make_tiny_hf_model
from llmx.build.convert import convert
from llmx.build.engine import build_engine
from llmx.common.errors import LlmxError
from llmx.runtime.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=16, device="cpu")
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 33, 2, 71], list(range(10, 47)), [101] * 3]
LAYOUTS = {  # family -> layouts beyond tp=1 (tiny models: 4 query heads, 2 KV heads, 2 layers)
    "llama": [Mapping(tp=2), Mapping(tp=4), Mapping(tp=2, pp=2)],
    "llama3": [Mapping(tp=2)],
    "mistral": [Mapping(tp=2)],
    "qwen2": [Mapping(tp=2), Mapping(pp=2)],
    "qwen3": [Mapping(tp=2), Mapping(tp=2, pp=2)],
}


def run_engine(engine_dir, ids):
    with LLM(engine_dir, kv_cache_tokens=512) as llm:
        logits = llm.runner.prompt_logits(ids)
        tokens = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
    return logits, tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """family -> (checkpoint, tp=1 logits, tp=1 greedy tokens)."""
    out = {}
    ids = list(range(3, 60))
    for family in LAYOUTS:
        tmp = tmp_path_factory.mktemp(family)
        ckpt = convert(make_tiny_hf_model(family, tmp / "hf"), tmp / "ckpt", dtype="float32")
        out[family] = (ckpt, *run_engine(build_engine(ckpt, tmp / "tp1", BUILD).path, ids))
    return out, ids


@pytest.mark.parametrize("family,mapping", [(f, m) for f, ms in LAYOUTS.items() for m in ms],
                         ids=lambda v: v if isinstance(v, str) else f"tp{v.tp}pp{v.pp}")
def test_parallel_layout_equals_one_rank(reference, family, mapping, tmp_path):
    refs, ids = reference
    ckpt, logits1, tokens1 = refs[family]
    engine = build_engine(ckpt, tmp_path / "engine", BUILD, mapping).path
    logits, tokens = run_engine(engine, ids)
    assert (logits - logits1).abs().max().item() <= 1e-4
    assert tokens == tokens1


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1(tmp_path):
    from helpers.smollm2 import smollm2_dir

    ckpt = convert(smollm2_dir(), tmp_path / "ckpt", dtype="float32")
    ids = list(range(1000, 1040))
    logits1, tokens1 = run_engine(build_engine(ckpt, tmp_path / "tp1", BUILD).path, ids)
    logits3, tokens3 = run_engine(build_engine(ckpt, tmp_path / "tp3", BUILD, Mapping(tp=3)).path, ids)
    assert (logits3 - logits1).abs().max().item() <= 1e-3
    assert tokens3 == tokens1


def test_quantized_int8_wo_tp2_equals_tp1(tmp_path):
    from llmx.quant.api import quantize

    fp32 = convert(make_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    ckpt = quantize(fp32, tmp_path / "q", algo="int8_wo").path
    ids = list(range(3, 40))
    logits1, tokens1 = run_engine(build_engine(ckpt, tmp_path / "tp1", BUILD).path, ids)
    logits2, tokens2 = run_engine(build_engine(ckpt, tmp_path / "tp2", BUILD, Mapping(tp=2)).path, ids)
    assert (logits2 - logits1).abs().max().item() <= 1e-4
    assert tokens2 == tokens1


def test_a_killed_rank_ends_the_job_with_an_error_not_a_hang(tmp_path):
    ckpt = convert(make_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    engine = build_engine(ckpt, tmp_path / "tp2", BUILD, Mapping(tp=2)).path
    llm = LLM(engine, kv_cache_tokens=512)
    worker = llm.runner.procs[0]
    llm.generate([[1, 2, 3]], GREEDY)
    os.kill(worker.pid, 9)
    worker.join(timeout=10)
    started = time.monotonic()
    with pytest.raises(LlmxError, match="rank 1 of 2 exited"):
        llm.generate([[1, 2, 3]], GREEDY)
    assert time.monotonic() - started < 30
    llm.close()
    assert not any(p.is_alive() for p in llm.runner.procs)
    assert not torch.distributed.is_initialized()

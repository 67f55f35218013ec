"""llmx's own model code against Hugging Face transformers on the same checkpoints.

Tiny random models of each family and RoPE scaling type (fast) and the real SmolLM2-135M (slower): logits
at every prompt position and greedy generations must match transformers. The RoPE variants and Phi-3 have
an original context of 32 tokens, so the 45-token prompt and the longer generations run past it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.tiny_models import ROPE_VARIANTS, make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", *ROPE_VARIANTS, "phi3", "gemma2", "gemma3"]


def make_engine(hf_dir, tmp, dtype="float32", **build):
    ckpt = convert(hf_dir, tmp / "ckpt", dtype=dtype)
    options = dict(max_batch_size=16, max_seq_len=256, max_num_tokens=256, kv_block_size=16, device="cpu")
    options.update(build)
    return build_engine(ckpt, tmp / "engine", BuildConfig(**options)).path


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    hf_dir = make_tiny_hf_model(request.param, tmp / "hf", dtype=torch.float32)
    engine = make_engine(hf_dir, tmp)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return request.param, hf, LLM(engine)


def test_tiny_logits_match_transformers(tiny):
    family, hf, llm = tiny
    ids = torch.randint(3, hf.config.vocab_size, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = llm.runner.prompt_logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4, family


# Phi-3's generate in transformers recomputes the whole KV cache with the long factors when a sequence
# crosses its original context (32 here); llmx keeps the cache, so its prompts stay on one side of it.
GREEDY_PROMPT_LENGTHS = {"phi3": (5, 8, 40)}


def test_tiny_greedy_matches_transformers_generate(tiny):
    family, hf, llm = tiny
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen).tolist()
               for n in GREEDY_PROMPT_LENGTHS.get(family, (5, 17, 33))]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        # transformers' dynamic RoPE keeps the longest length a model object has seen; a fresh copy per prompt
        # gives each generation its own, as llmx gives each sequence.
        model = AutoModelForCausalLM.from_pretrained(hf.name_or_path, dtype=torch.float32).eval()
        assert out.output_token_ids == hf_greedy(model, prompt, 24), family


# ---- the real SmolLM2-135M -------------------------------------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition,",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from helpers.smollm2 import smollm2_dir

    hf_dir = smollm2_dir()
    tmp = tmp_path_factory.mktemp("smollm2")
    engine = make_engine(hf_dir, tmp, dtype="float32", max_seq_len=512, max_num_tokens=512)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf_dir, hf, LLM(engine)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_fp32(smollm2):
    _, hf, llm = smollm2
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float()
        got = llm.runner.prompt_logits(ids)
        assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_match_transformers(smollm2):
    _, hf, llm = smollm2
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=64, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert out.output_token_ids == hf_greedy(hf, prompt, 64)
        assert out.text == llm.tokenizer.decode(out.output_token_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_bf16_logits_within_bf16_rounding(smollm2, tmp_path):
    hf_dir, _, _ = smollm2
    llm = LLM(make_engine(hf_dir, tmp_path, dtype="bfloat16"))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    ids = llm.tokenizer.encode(PROMPTS[3])
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = llm.runner.prompt_logits(ids)
    # bf16 keeps 8 bits of mantissa: after 30 layers the two implementations round differently, so
    # compare against the logits' scale and require the same next-token choice almost everywhere.
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 0.05 * scale
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.9


# ---- the real Gemma 3 270M (262k vocabulary, 18 layers: 5 sliding of window 512 per global) ------------------------


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    from helpers.gemma3 import gemma3_dir

    hf_dir = gemma3_dir()
    engine = make_engine(hf_dir, tmp_path_factory.mktemp("gemma3"), dtype="float32", max_batch_size=4)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf, LLM(engine)


@pytest.mark.slow
def test_gemma3_270m_logits_and_greedy_tokens_match_transformers_fp32(gemma3):
    hf, llm = gemma3
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    for ids in prompts:
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits[0].float()
        assert (llm.runner.prompt_logits(ids) - expected).abs().max().item() <= 1e-4
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        assert out.output_token_ids == hf_greedy(hf, prompt, 16)


@pytest.mark.slow
def test_gemma3_270m_perplexity_equals_transformers_loss(tmp_path):
    """520-token windows: past the 512-token sliding window, on held-out Austen."""
    import math

    from transformers import AutoTokenizer

    from helpers.corpus import CORPUS
    from helpers.gemma3 import gemma3_dir
    from llmx.eval.perplexity import evaluate_perplexity

    hf_dir = gemma3_dir()
    data = tmp_path / "text.txt"
    data.write_text((CORPUS / "austen_persuasion.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    result = evaluate_perplexity(convert(hf_dir, tmp_path / "ckpt", dtype="float32"), data, seq_len=520, windows=2)
    ids = AutoTokenizer.from_pretrained(hf_dir).encode(data.read_text(encoding="utf-8"), add_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(w, labels=w).loss.item() for w in (torch.tensor([ids[i * 520:(i + 1) * 520]]) for i in (0, 1))]
    assert result.num_windows == 2 and result.num_tokens == 2 * 519
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)

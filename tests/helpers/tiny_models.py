"""Tiny random Hugging Face checkpoints, one per supported family, for fast tests (shared by every package).

`make_tiny_hf_model("qwen3", tmp_path / "hf")` writes config.json, safetensors weights and a real
(tiny) tokenizer that `transformers.AutoTokenizer.from_pretrained` loads offline. Sizes: hidden 64,
intermediate 128, 2 layers, 4 heads, 2 KV heads, vocab 256, 512 positions. Family variants:

- llama:   Llama-2 style, no RoPE scaling
- llama3:  Llama-3.1 style: rope_theta 500000, rope_scaling type "llama3"
- mistral: sliding_window 32, so prompts longer than 32 tokens exercise the window
- qwen2:   q/k/v bias, no o bias
- qwen3:   q_norm/k_norm, head_dim 32 (q_size 128 != hidden 64)
- llama_linear, llama_dynamic, llama_yarn, llama_longrope: Llama with that RoPE scaling type and an original
  context of 32 tokens (max_position_embeddings 32 for dynamic, whose scaling starts there), so prompts of
  a few dozen tokens run past it
- phi3:    fused qkv_proj / gate_up_proj, partial rotary (half of head_dim 16), LongRoPE over an original
  context of 32 tokens
- gemma2:  3 layers, sliding (window 8) / global / sliding, query_pre_attn_scalar 24, attention and final
  logits soft-capped at 5 (low enough to bend these tiny models' scores), tied embeddings
- gemma3:  the same pattern with q/k norm, RoPE base 1e6 with linear scaling (factor 2) on the global layer
  and 1e4 on the sliding ones, no soft-caps
- mixtral: 4 experts of intermediate 128, top-2 renormalised, both layers sparse
- qwen3_moe: q/k norm, head_dim 32, 8 experts of intermediate 32, top-3 with norm_topk_prob, 3 layers of which
  layer 1 is dense (`mlp_only_layers` [1], intermediate 128)
- qwen2_moe: 6 experts of intermediate 32, top-2 not renormalised, a shared expert of 48 behind its sigmoid gate,
  q/k/v bias; `decoder_sparse_step` 2 of 3 layers: layer 1 sparse, layers 0 and 2 dense

Norm weights and biases are perturbed away from their 1 / 0 initialisation, so a test that swaps or
drops one of them sees different logits.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from helpers.corpus import CORPUS

TINY_FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "llama_linear", "llama_dynamic", "llama_yarn",
                 "llama_longrope", "phi3", "gemma2", "gemma3", "mixtral", "qwen3_moe", "qwen2_moe")
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
ROPE_VARIANTS = ("llama_linear", "llama_dynamic", "llama_yarn", "llama_longrope")
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # 5x the usual 0.02: attention then shapes the logits enough that RoPE, masking and KV mistakes
    # change greedy tokens instead of hiding behind the embedding -> lm_head path.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
_VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(rope_theta=10000.0),
    "llama3": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}),
    "mistral": dict(rope_theta=10000.0, sliding_window=32),
    "qwen2": dict(rope_theta=1000000.0),
    "qwen3": dict(rope_theta=1000000.0, head_dim=32),
    "llama_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "llama_dynamic": dict(max_position_embeddings=32,
                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "llama_yarn": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
    # head_dim 16: 8 pairs, each with its own factor.
    "llama_longrope": dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32, "factor": 4.0,
        "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}),
    # Phi-3 keeps the pretraining context at the top level; rotary_dim 8 -> 4 factors per set.
    "phi3": dict(pad_token_id=0, original_max_position_embeddings=32, partial_rotary_factor=0.5,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0]},
                 max_position_embeddings=128),
    "gemma2": dict(head_dim=16, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   attn_logit_softcapping=5.0, final_logit_softcapping=5.0, rope_theta=10000.0, pad_token_id=0),
    "gemma3": dict(head_dim=16, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0,
                   rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "mixtral": dict(rope_theta=1e6, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(rope_theta=1e6, head_dim=32, num_hidden_layers=3, num_experts=8, num_experts_per_tok=3,
                      moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(rope_theta=1e6, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, norm_topk_prob=False,
                      decoder_sparse_step=2),
}
# Gemma ties its embeddings; the other families' tiny models do not unless asked.
_TIED_BY_DEFAULT = ("gemma2", "gemma3")


def tiny_hf_config(family: str, *, tie: bool = False, **overrides: Any):
    """The transformers config object of a tiny model of `family` (see TINY_FAMILIES)."""
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, MixtralConfig, Phi3Config,
                              Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

    classes = {"llama": LlamaConfig, "llama3": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
               "qwen3": Qwen3Config, "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig,
               "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig, "qwen2_moe": Qwen2MoeConfig,
               **{v: LlamaConfig for v in ROPE_VARIANTS}}
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")
    kwargs = {**_COMMON, **_VARIANTS[family], "tie_word_embeddings": tie or family in _TIED_BY_DEFAULT, **overrides}
    return classes[family](**kwargs)


def make_tiny_hf_model(family: str, out_dir: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                       tie: bool = False, multi_shard: bool = False, **overrides: Any) -> Path:
    """Write a tiny random HF model folder (config, safetensors, tokenizer) to `out_dir` and return it.

    multi_shard: several model-0000x-of-0000y.safetensors shards plus model.safetensors.index.json.
    overrides: any config field (e.g. num_hidden_layers=3, attention_bias=True).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    config = tiny_hf_config(family, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    # A tiny fp32 model is ~0.5 MB: 100 kB shards give several files.
    model.save_pretrained(out_dir, max_shard_size="100KB" if multi_shard else "10GB")
    write_tiny_tokenizer(out_dir, vocab_size=config.vocab_size)
    return out_dir


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> None:
    """A BPE tokenizer (<= vocab_size tokens; <unk>=0, <s>=1, </s>=2; prepends <s>) with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained_tokenizer(vocab_size), bos_token=BOS,
                                        eos_token=EOS, unk_token=UNK, chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(out_dir)


@functools.lru_cache(maxsize=4)
def _trained_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    text = (CORPUS / "austen_emma.txt").read_text(encoding="utf-8")[:40_000]
    lines = [line for line in text.splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], limit_alphabet=80,
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def make_outlier_llama(out_dir: Path, *, final_norm: bool = False) -> Path:
    """A tiny bf16 Llama (make_tiny_hf_model) whose RMSNorm weights have 4 channels scaled by 10, like the
    activation outliers of real LLMs: smoothing algorithms (AWQ, SmoothQuant) then choose far-from-one
    vectors, so a wrong fold of them shows in the logits. final_norm: scale the final norm's too (the LM
    head's input), not only the layers' norms."""
    from safetensors.torch import load_file, save_file

    hf = make_tiny_hf_model("llama", out_dir, dtype=torch.bfloat16)
    tensors = load_file(hf / "model.safetensors")
    outliers = torch.randperm(tensors["model.norm.weight"].shape[0], generator=torch.Generator().manual_seed(3))[:4]
    for name, t in tensors.items():
        if name.endswith("layernorm.weight") or (final_norm and name == "model.norm.weight"):
            t[outliers] *= 10
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    return hf

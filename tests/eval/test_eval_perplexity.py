"""llmx's perplexity against transformers' own loss on the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.common.errors import LlmxError
from llmx.eval.perplexity import evaluate_perplexity

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 6


def test_checkpoint_perplexity_equals_transformers_loss(tmp_path):
    hf_dir = make_tiny_hf_model("qwen2", tmp_path / "hf", dtype=torch.float32)
    ckpt = convert(hf_dir, tmp_path / "ckpt", dtype="float32")
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    result = evaluate_perplexity(ckpt, data, seq_len=32, windows=3)

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    losses = []
    with torch.no_grad():
        for w in range(3):
            window = torch.tensor([ids[w * 32:(w + 1) * 32]])
            losses.append(model(window, labels=window).loss.item())
    assert result.num_windows == 3 and result.num_tokens == 3 * 31
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)

    with pytest.raises(LlmxError, match="are needed for 1000 window"):
        evaluate_perplexity(ckpt, data, seq_len=32, windows=1000)

"""runtime/chat_template.py: a chat template that raises, is refused by the sandbox or never finishes is one
sentence, within the deadline; a normal template renders as transformers renders it."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from llmx.common.errors import LlmxError
from llmx.runtime.chat_template import render_chat_ids

MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from helpers.tiny_models import make_tiny_hf_model

    return AutoTokenizer.from_pretrained(str(make_tiny_hf_model("llama", tmp_path_factory.mktemp("chat") / "hf")))


def with_template(tokenizer, template: str):
    tokenizer.chat_template = template
    return tokenizer


def test_a_normal_template_renders_as_transformers_does(tokenizer):
    tok = with_template(tokenizer, "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                   "{% if add_generation_prompt %}<assistant>{% endif %}")
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert render_chat_ids(tok, MESSAGES, "engine", max_chars=10_000) == list(expected)


@pytest.mark.parametrize("template, fragment", [
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
])
def test_a_template_that_fails_is_one_sentence(tokenizer, template, fragment):
    with pytest.raises(LlmxError) as info:
        render_chat_ids(with_template(tokenizer, template), MESSAGES, "engine", max_chars=10_000)
    assert fragment in info.value.message and "\n" not in info.value.message


def test_a_template_that_never_finishes_is_stopped_at_the_deadline(tokenizer):
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% set x = i * j %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(LlmxError) as info:
        render_chat_ids(with_template(tokenizer, endless), MESSAGES, "engine", max_chars=10_000, seconds=0.5)
    assert time.monotonic() - start < 5
    assert "did not finish within 0.5 s" in info.value.message


def test_a_deadline_expiring_as_rendering_ends_leaves_no_exception_behind(tokenizer):
    """Deadlines about as long as a render: each call returns the ids or one sentence, and no injected exception
    is left pending to surface later in the caller."""
    tok = with_template(tokenizer, "{% for m in messages %}{{ m.content }}{% endfor %}")
    outcomes = set()
    for i in range(200):
        try:
            render_chat_ids(tok, MESSAGES, "engine", max_chars=10_000, seconds=0.0002 * (1 + i % 20))
            outcomes.add("rendered")
        except LlmxError:
            outcomes.add("stopped")
    total = 0
    for i in range(3_000_000):  # a pending injected exception would surface in a loop like this one
        total += i
    assert total > 0 and "rendered" in outcomes


def test_a_template_that_makes_too_much_text_is_refused_before_tokenizing(tokenizer):
    huge = "{{ 'many words ' * 1000000 }}"
    start = time.monotonic()
    with pytest.raises(LlmxError) as info:
        render_chat_ids(with_template(tokenizer, huge), MESSAGES, "engine", max_chars=10_000)
    assert "made 11,000,000 characters" in info.value.message and "more than the 10,000" in info.value.message
    assert time.monotonic() - start < 5

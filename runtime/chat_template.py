"""Rendering a tokenizer's chat template: bounded in time, and every failure one sentence.

A chat template is code from the model folder (Jinja, run by transformers in its sandbox). The sandbox refuses
attribute tricks, but not work: nested loops over `range` can run for hours, and one expression can make a
gigabyte of text. Rendering therefore runs under a deadline, and its text is measured before it is tokenized
(tokenizing runs in native code that no deadline interrupts); a template that raises (`raise_exception`), that
the sandbox refuses, that outruns the deadline or makes more text than the engine could hold ends in an
LlmxError naming the engine.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable

from llmx.common.errors import LlmxError

# A real template renders a conversation in milliseconds; this leaves room for very long conversations.
RENDER_SECONDS = 10.0


class _Deadline(BaseException):
    """Raised inside the rendering thread when its time is up (a BaseException: no template code catches it)."""


def render_chat_ids(tokenizer: Any, messages: list[dict[str, str]], name: str, max_chars: int,
                    seconds: float = RENDER_SECONDS) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ending with the assistant's prompt.

    max_chars: the most text the rendering may make (a bound well above what the engine's context holds).
    """
    text = _render_text(tokenizer, messages, name, seconds)
    if len(text) > max_chars:
        raise LlmxError(f"{name}: the tokenizer's chat template made {len(text):,} characters of these messages, "
                        f"more than the {max_chars:,} the engine's context could hold; shorten the conversation "
                        "or fix the template.")
    # what apply_chat_template(tokenize=True) does with the text: the template wrote the special tokens
    return list(tokenizer.encode(text, add_special_tokens=False))


def _render_text(tokenizer: Any, messages: list[dict[str, str]], name: str, seconds: float) -> str:
    from jinja2 import TemplateError

    def render() -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    try:
        return _with_deadline(render, seconds)
    except _Deadline:
        raise LlmxError(f"{name}: the tokenizer's chat template did not finish within {seconds:g} s; the template "
                        "loops without end or does far too much work: fix chat_template in tokenizer_config.json "
                        "(or chat_template.jinja).") from None
    except TemplateError as exc:  # raise_exception(...), a refused attribute (SecurityError), a syntax error
        raise LlmxError(f"{name}: the tokenizer's chat template refused these messages ({type(exc).__name__}: "
                        f"{exc}).") from None


def _with_deadline(fn: Callable[[], Any], seconds: float) -> Any:
    """fn() in this thread; after `seconds` a _Deadline is raised inside it at its next bytecode.

    The timer thread injects the exception with PyThreadState_SetAsyncExc only while fn runs; if it fired but
    the exception was not delivered before fn returned, the pending exception is withdrawn.
    """
    thread_id = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"running": True, "fired": False}

    def expire() -> None:
        with lock:
            if state["running"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, ctypes.py_object(_Deadline))

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        with lock:
            state["running"] = False
            if state["fired"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(thread_id, None)
        timer.cancel()

"""OpenAI response bodies and stream chunks from the engine's Pieces: choices, log-probabilities, usage."""

from __future__ import annotations

import functools
import json
import time
import uuid
from dataclasses import dataclass, field

from llmx.serve.engine_loop import Piece


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class TokenText:
    """Token ids as the strings OpenAI's logprobs show: each token decoded on its own (cached per id), or
    "token_id:ID" when the request asks for ids (`return_tokens_as_token_ids`) or the engine has no tokenizer."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self._tokenizer = None if as_ids else tokenizer

    @functools.lru_cache(maxsize=1 << 16)
    def __call__(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._tokenizer.decode([token_id])


@dataclass
class Choice:
    """A choice as it accumulates (for non-streamed answers)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    prompt_logprobs: list | None = None

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.token_ids.extend(piece.token_ids)
        self.logprobs.extend(piece.logprobs or ())
        if piece.prompt_logprobs is not None:
            self.prompt_logprobs = piece.prompt_logprobs
        self.num_prompt_tokens = piece.num_prompt_tokens or self.num_prompt_tokens
        if piece.finished:
            self.finish_reason = piece.finish_reason


def completion_logprobs(entries: list, token_text: TokenText, start_offset: int = 0) -> dict:
    """The completions API's logprobs object for TokenLogprobs entries (None for a first prompt token)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for entry in entries:
        if entry is None:
            continue
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top = {token_text(t): v for t, v in entry.top}
        top.setdefault(text, entry.logprob)
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def echo_logprobs(prompt_ids: list[int], prompt_entries: list, token_text: TokenText) -> dict:
    """The prompt's part of an echoed logprobs object: its first token has no log-probability."""
    first = token_text(prompt_ids[0])
    rest = completion_logprobs(prompt_entries[1:], token_text, len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def join_logprobs(a: dict, b: dict) -> dict:
    shift = (a["text_offset"][-1] + len(a["tokens"][-1])) if a["tokens"] else 0
    return {"tokens": a["tokens"] + b["tokens"], "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
            "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
            "text_offset": a["text_offset"] + [o + shift for o in b["text_offset"]]}


def chat_logprobs(entries: list, token_text: TokenText) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list, **extra) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}

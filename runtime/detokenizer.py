"""Incremental detokenization: each step decodes only the last few tokens, never the whole output.

A token can end in the middle of a multi-byte character (byte-level BPE); such text is held back until
the character completes, so streamed pieces always concatenate to the full decoded output.

`OutputText` is one request's text, token by token, detokenized only when needed: right after each step for
a request with stop strings (the engine must see them to stop it), otherwise when the text of one of the
request's outputs is first read. Either way the tokens go through the same incremental steps in the same
order, so the text is the same; a caller that only counts tokens (bench) never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so the first piece gets its leading space right

Decode = Callable[[list[int]], str]  # token ids -> text, special tokens skipped


@dataclass
class DetokenizerState:
    ids: list[int]
    prefix_offset: int
    read_offset: int
    text: str = ""

    @classmethod
    def for_prompt(cls, prompt_ids: list[int]) -> "DetokenizerState":
        context = list(prompt_ids[-_PROMPT_CONTEXT:])
        return cls(ids=context, prefix_offset=0, read_offset=len(context))


def decoder_for(tokenizer) -> Decode:
    """`ids -> tokenizer.decode(ids, skip_special_tokens=True)`, minus transformers' per-call overhead where
    that is provably the same call.

    A step decodes two short windows per request, so the ~2 us of Python that `decode` spends converting
    and dispatching its argument before reaching the Rust tokenizer is most of the cost. For a
    tokenizers-backed tokenizer whose class keeps transformers' own `decode`/`_decode`, `decode(list)` is
    `_decode(list)`, which is the Rust `decode` followed by the optional clean-up of tokenization spaces;
    any other tokenizer goes through `decode`.
    """
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        TokenizersBackend = None
    cls = type(tokenizer)
    if TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend) \
            and cls.decode is TokenizersBackend.decode and cls._decode is TokenizersBackend._decode:
        if not tokenizer.clean_up_tokenization_spaces:
            return partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
        return partial(tokenizer._decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


def detokenize_step(decode: Decode, state: DetokenizerState, new_ids: list[int]) -> str:
    """Append `new_ids` and return the newly completed text (possibly empty); `decode` from decoder_for."""
    state.ids.extend(new_ids)
    prefix = decode(state.ids[state.prefix_offset:state.read_offset])
    full = decode(state.ids[state.prefix_offset:])
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new_text = full[len(prefix):]
    state.prefix_offset = state.read_offset
    state.read_offset = len(state.ids)
    state.text += new_text
    return new_text


class OutputText:
    """The visible text of one request after each of its output tokens.

    `output_token_ids` is the sequence's own list, which the scheduler appends to (one token per step).
    The text after n tokens is `decoded[:end[n]]`, where `decoded` is the incremental detokenization of the
    tokens (append-only) and end[n] is how much of it the caller may see: all of it, or for a request with
    stop strings, less the characters that might begin a stop string, or up to the stop string that
    finished it. A decode-less OutputText (an engine without tokenizer) has empty text.
    """

    __slots__ = ("_decode", "_state", "_tokens", "_ends", "_hidden", "stops", "_longest_stop")

    def __init__(self, decode: Decode | None, prompt_token_ids: list[int], output_token_ids: list[int],
                 stops: tuple[str, ...] = ()):
        self._decode = decode
        self._state = DetokenizerState.for_prompt(prompt_token_ids)
        self._tokens = output_token_ids
        self._ends = [0]  # end[n] for the n tokens detokenized so far
        self._hidden: int | None = None  # index of a token that is not text (the EOS that ended the request)
        self.stops = tuple(stops)
        self._longest_stop = max(map(len, self.stops), default=0)

    def hide(self, index: int) -> None:
        """Token `index` (not yet detokenized) stays out of the text: the EOS token that finished the request."""
        if index < len(self._ends) - 1:
            raise ValueError(f"output token {index} is already detokenized; hide it before its text is read")
        self._hidden = index

    def text_between(self, start: int, end: int) -> str:
        """The text that output tokens [start, end) added (detokenizing up to token end - 1 if not done yet)."""
        ends = self._ends
        while len(ends) <= end:
            self._detokenize_next()
            ends.append(len(self._state.text))
        return self._state.text[ends[start]:ends[end]]

    def check_stops(self, num_tokens: int, finished: bool, search: bool = True) -> bool:
        """Detokenize up to the request's num_tokens-th output token right away and find the stop strings in
        the new text; True if one ends the request (its text then ends before the stop string). search=False
        (the request has fewer than its min_tokens) finds none but keeps the same characters invisible, so a
        stop string completed by a later token is still found.

        While no stop string is found, the last len(longest stop) - 1 characters stay invisible, since a later
        token may complete a stop string that begins in them. A request already finished (length, EOS, stop
        token) is not searched, and its whole text is visible.
        """
        ends = self._ends
        if len(ends) != num_tokens:
            raise ValueError(f"check_stops got output token {num_tokens - 1} after {len(ends) - 1} detokenized "
                             "ones; a request with stop strings must be checked after every token, in order")
        self._detokenize_next()
        decoded = self._state.text
        shown = ends[-1]
        visible, stopped = len(decoded), False
        if not finished:
            longest = self._longest_stop
            search_from = max(0, shown - longest)
            hits = [i for x in self.stops if (i := decoded.find(x, search_from)) >= 0] if search else []
            if hits:
                visible, stopped = min(hits), True
            else:
                visible -= longest - 1
        ends.append(max(shown, visible))
        return stopped

    def _detokenize_next(self) -> None:
        index = len(self._ends) - 1
        if self._decode is not None and index != self._hidden:
            detokenize_step(self._decode, self._state, [self._tokens[index]])

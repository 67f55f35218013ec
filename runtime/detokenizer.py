"""Incremental detokenization: each step decodes only the last few tokens, never the whole output.

A token can end in the middle of a multi-byte character (byte-level BPE); such text is held back until
the character completes, so streamed pieces always concatenate to the full decoded output.
"""

from __future__ import annotations

from dataclasses import dataclass

_PROMPT_CONTEXT = 4  # prompt tokens decoded with the output so the first piece gets its leading space right


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


def detokenize_step(tokenizer, state: DetokenizerState, new_ids: list[int]) -> str:
    """Append `new_ids` and return the newly completed text (possibly empty)."""
    state.ids.extend(new_ids)
    prefix = tokenizer.decode(state.ids[state.prefix_offset:state.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(state.ids[state.prefix_offset:], skip_special_tokens=True)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new_text = full[len(prefix):]
    state.prefix_offset = state.read_offset
    state.read_offset = len(state.ids)
    state.text += new_text
    return new_text

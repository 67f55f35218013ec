"""The requests a benchmark sends: synthetic prompts of exact lengths, or prompts from a jsonl dataset.

Synthetic prompts are random token ids (special tokens excluded, so no stray BOS/EOS/chat markers steer
the model), drawn from a seeded generator: the same seed gives the same requests on every machine. They
are handed to the runtime as token ids, so their length is exact and tokenization is not timed. Every
request sets `ignore_eos`, so it produces exactly its output length and runs are comparable.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from llmx.common.errors import LlmxError
from llmx.common.text import read_utf8
from llmx.runtime.sequence import SamplingParams


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.output_len, ignore_eos=True)


def sampleable_token_ids(vocab_size: int, special_ids: Iterable[int]) -> list[int]:
    """Token ids a synthetic prompt may use: the whole vocabulary except special tokens."""
    special = set(special_ids)
    ids = [i for i in range(vocab_size) if i not in special]
    if not ids:
        raise LlmxError(f"the tokenizer's vocabulary ({vocab_size} ids) holds only special tokens; "
                        "synthetic prompts need ordinary tokens.")
    return ids


def synthetic_requests(*, num_requests: int, isl: int, osl: int, token_ids: list[int], seed: int) -> list[BenchRequest]:
    """`num_requests` prompts of exactly `isl` random tokens, each asking for exactly `osl` output tokens."""
    rng = random.Random(seed)
    return [BenchRequest(tuple(rng.choices(token_ids, k=isl)), osl) for _ in range(num_requests)]


def warmup_requests(requests: list[BenchRequest], count: int, *, token_ids: list[int], seed: int) -> list[BenchRequest]:
    """`count` requests shaped like the first measured ones but with other random tokens.

    Fresh tokens (not copies) keep the warmup from seeding the prefix cache with the measured prompts.
    """
    rng = random.Random(seed)
    shapes = [requests[i % len(requests)] for i in range(count)] if requests else []
    return [BenchRequest(tuple(rng.choices(token_ids, k=r.input_len)), r.output_len) for r in shapes]


def dataset_requests(path: Path, encode, *, default_output_len: int, num_requests: int | None) -> list[BenchRequest]:
    """Requests from a jsonl file: {"prompt": str, "output_len" or "max_tokens": int (else the default)}.

    `encode(text) -> list[int]` tokenizes a prompt (done before the clock starts). Takes the first
    `num_requests` lines, or all of them.
    """
    if not path.is_file():
        raise LlmxError(f"{path}: no such dataset file; pass a .jsonl file with one {{\"prompt\": ...}} per line.")
    requests = []
    for line_no, line in enumerate(read_utf8(path, what="dataset").splitlines(), 1):
        if not line.strip():
            continue
        if num_requests is not None and len(requests) == num_requests:
            break
        record = _parse_line(path, line_no, line)
        output_len = record.get("output_len", record.get("max_tokens", default_output_len))
        if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
            raise LlmxError(f"{path}:{line_no}: output_len/max_tokens must be a positive integer, got {output_len!r}.")
        requests.append(BenchRequest(tuple(encode(record["prompt"])), output_len))
    if not requests:
        raise LlmxError(f"{path}: holds no requests; write one {{\"prompt\": ...}} object per line.")
    if num_requests is not None and len(requests) < num_requests:
        raise LlmxError(f"{path}: holds {len(requests)} requests but --num-requests is {num_requests}; "
                        "lower --num-requests or leave it out to use the whole file.")
    return requests


def _parse_line(path: Path, line_no: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LlmxError(f"{path}:{line_no}: not valid JSON ({exc.msg}).") from exc
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise LlmxError(f"{path}:{line_no}: each line needs a string field \"prompt\".")
    return record


def check_fits(requests: list[BenchRequest], max_seq_len: int, source: str) -> None:
    """Refuse, before anything runs, a request longer than the engine allows (it would fail mid-benchmark)."""
    for i, r in enumerate(requests):
        if r.input_len + r.output_len > max_seq_len:
            raise LlmxError(f"{source}: request {i} needs {r.input_len} input + {r.output_len} output tokens but the "
                            f"engine's max_seq_len is {max_seq_len}; use shorter requests or rebuild with a larger "
                            "--max-seq-len.")

"""Workloads: seeded synthetic prompts of exact lengths without special tokens, and jsonl datasets."""

from __future__ import annotations

import json

import pytest

from llmx.bench.workload import (BenchRequest, check_fits, dataset_requests, sampleable_token_ids,
                                 synthetic_requests, warmup_requests)
from llmx.common.errors import LlmxError


def test_sampleable_ids_exclude_special_tokens():
    assert sampleable_token_ids(6, [0, 2, 5]) == [1, 3, 4]
    with pytest.raises(LlmxError, match="only special tokens"):
        sampleable_token_ids(2, [0, 1])


def test_synthetic_requests_are_exact_seeded_and_special_free():
    ids = sampleable_token_ids(100, [0, 1, 2])
    a = synthetic_requests(num_requests=5, isl=37, osl=9, token_ids=ids, seed=3)
    b = synthetic_requests(num_requests=5, isl=37, osl=9, token_ids=ids, seed=3)
    c = synthetic_requests(num_requests=5, isl=37, osl=9, token_ids=ids, seed=4)
    assert a == b
    assert a != c
    assert all(r.input_len == 37 and r.output_len == 9 for r in a)
    assert not {0, 1, 2} & {t for r in a for t in r.prompt_token_ids}
    assert len({r.prompt_token_ids for r in a}) == 5  # distinct prompts: no accidental prefix-cache hits


def test_requests_ignore_eos_and_ask_for_their_exact_length():
    params = BenchRequest((5, 6, 7), 12).sampling_params()
    assert params.ignore_eos and params.max_new_tokens == 12 and params.greedy


def test_warmup_copies_shapes_not_tokens():
    ids = list(range(3, 50))
    measured = synthetic_requests(num_requests=2, isl=20, osl=4, token_ids=ids, seed=0)
    warm = warmup_requests(measured, 3, token_ids=ids, seed=1)
    assert [(r.input_len, r.output_len) for r in warm] == [(20, 4)] * 3
    assert not {r.prompt_token_ids for r in warm} & {r.prompt_token_ids for r in measured}
    assert warmup_requests(measured, 0, token_ids=ids, seed=1) == []


def encode(text):
    return [ord(ch) for ch in text]


def test_dataset_lines_give_prompts_and_output_lengths(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "abc", "output_len": 5}),
                               "",
                               json.dumps({"prompt": "hello", "max_tokens": 7}),
                               json.dumps({"prompt": "xy"})]) + "\n")
    requests = dataset_requests(path, encode, default_output_len=3, num_requests=None)
    assert [(r.prompt_token_ids, r.output_len) for r in requests] == [
        (tuple(encode("abc")), 5), (tuple(encode("hello")), 7), (tuple(encode("xy")), 3)]
    assert len(dataset_requests(path, encode, default_output_len=3, num_requests=2)) == 2


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"text": "x"}', 'd.jsonl:2: each line needs a string field "prompt"'),
    ('{"prompt": "x", "output_len": 0}', "d.jsonl:2: output_len/max_tokens must be a positive integer"),
])
def test_dataset_errors_name_the_line(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(LlmxError, match=fragment):
        dataset_requests(path, encode, default_output_len=3, num_requests=None)


def test_dataset_missing_empty_or_too_short(tmp_path):
    with pytest.raises(LlmxError, match="no such dataset file"):
        dataset_requests(tmp_path / "nope.jsonl", encode, default_output_len=3, num_requests=None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LlmxError, match="holds no requests"):
        dataset_requests(empty, encode, default_output_len=3, num_requests=None)
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(LlmxError, match="holds 1 requests but --num-requests is 4"):
        dataset_requests(one, encode, default_output_len=3, num_requests=4)


def test_check_fits_refuses_requests_longer_than_the_engine():
    check_fits([BenchRequest((1,) * 10, 6)], 16, "x")
    with pytest.raises(LlmxError, match=r"request 1 needs 10 input \+ 7 output tokens but the engine's max_seq_len is 16"):
        check_fits([BenchRequest((1,) * 10, 6), BenchRequest((1,) * 10, 7)], 16, "--isl 10")

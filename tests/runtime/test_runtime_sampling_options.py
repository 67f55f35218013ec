"""Sampling options beyond temperature/top-k/top-p, end to end on CPU: log-probabilities (of generated and of
prompt tokens), penalties, min_tokens, n completions by seed, and aborting a request."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.layers.sampler import penalize
from llmx.runtime.sequence import SamplingParams

PROMPTS = ["It was a truth universally", "Emma Woodhouse, handsome", "Mr. Knightley said", "She was the youngest"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampling")
    ckpt = convert(make_tiny_hf_model("llama", tmp / "hf", dtype=torch.float32), tmp / "ckpt", dtype="float32")
    # max_num_tokens 8: prompts of more than 8 tokens are prefilled (and scored) in several chunks.
    build = BuildConfig(max_batch_size=8, max_seq_len=64, max_num_tokens=8, kv_block_size=4, device="cpu")
    return build_engine(ckpt, tmp / "engine", build).path


def test_output_logprobs_equal_the_prompt_logprobs_of_the_same_tokens(engine):
    llm = LLM(engine)
    [out] = llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=6, logprobs=3, ignore_eos=True))
    assert [lp.token_id for lp in out.logprobs] == out.output_token_ids
    for lp in out.logprobs:  # greedy: the chosen token is the likeliest one
        assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
    full = out.prompt_token_ids + out.output_token_ids
    [scored] = llm.generate([full], SamplingParams(max_new_tokens=1, prompt_logprobs=3))
    prompt_lps = scored.prompt_logprobs
    assert len(prompt_lps) == len(full) and prompt_lps[0] is None
    assert [lp.token_id for lp in prompt_lps[1:]] == full[1:]
    for generated, scored_lp in zip(out.logprobs, prompt_lps[len(out.prompt_token_ids):]):
        assert scored_lp.logprob == pytest.approx(generated.logprob, abs=1e-4)
        assert [t for t, _ in scored_lp.top] == [t for t, _ in generated.top]
    # The same numbers as the perplexity path's scoring of the whole sequence.
    reference = llm.runner.score(full).tolist()
    assert [lp.logprob for lp in prompt_lps[1:]] == pytest.approx(reference, abs=1e-4)
    assert llm.block_manager.num_used_blocks == 0  # the scoring pass gave its blocks back


def test_logprobs_are_the_same_queued_ahead_and_one_step_at_a_time(engine):
    params = [SamplingParams(max_new_tokens=8, logprobs=2, temperature=0.8, seed=i, presence_penalty=1.5,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    ahead = LLM(engine).generate(PROMPTS, params)
    one_by_one = LLM(engine, async_steps=False).generate(PROMPTS, params)
    for a, b in zip(ahead, one_by_one):
        assert a.output_token_ids == b.output_token_ids
        assert [lp.logprob for lp in a.logprobs] == pytest.approx([lp.logprob for lp in b.logprobs], abs=1e-5)


def test_penalize_follows_the_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    prompt_mask = torch.tensor([[True, True, False, False]])
    counts = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)]
    out = penalize(logits, prompt_mask, counts, params)
    # token 0: in the prompt, positive -> /2; 1: in the prompt, negative -> *2; 2: generated twice -> /2, then
    # -0.5*2 (frequency) -0.25 (presence); 3: unseen, unchanged.
    assert out[0].tolist() == pytest.approx([1.0, -2.0, 0.25 - 1.0 - 0.25, 3.0])


def test_repetition_penalty_stops_repeats_and_does_not_leak_into_other_requests(engine):
    llm = LLM(engine)
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    penalized = SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1000.0)
    [alone] = llm.generate([PROMPTS[0]], penalized)
    tokens = alone.output_token_ids
    assert len(set(tokens)) == len(tokens) and not set(tokens) & set(alone.prompt_token_ids)
    plain_alone = [llm.generate([p], plain)[0].output_token_ids for p in PROMPTS[1:]]
    assert any(len(set(t)) < len(t) for t in plain_alone + [llm.generate([PROMPTS[0]], plain)[0].output_token_ids])
    batched = llm.generate(PROMPTS, [penalized] + [plain] * 3)
    assert batched[0].output_token_ids == tokens
    assert [o.output_token_ids for o in batched[1:]] == plain_alone


def test_frequency_penalty_changes_greedy_output_and_zero_penalties_do_not(engine):
    llm = LLM(engine)
    base = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    zero = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True, min_tokens=0,
                                                frequency_penalty=0.0, presence_penalty=0.0))
    assert [o.output_token_ids for o in zero] == [o.output_token_ids for o in base]
    freq = llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True, frequency_penalty=2.0))
    assert [o.output_token_ids for o in freq] != [o.output_token_ids for o in base]


def test_min_tokens_holds_back_stop_tokens(engine):
    llm = LLM(engine)
    [free] = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    first = free.output_token_ids[0]
    [stopped] = llm.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, stop_token_ids=(first,)))
    assert stopped.output_token_ids == [first] and stopped.finish_reason == "stop"
    held = SamplingParams(max_new_tokens=8, stop_token_ids=(first,), min_tokens=4, ignore_eos=True)
    [out] = llm.generate([PROMPTS[1]], held)
    assert len(out.output_token_ids) >= 4 and first not in out.output_token_ids[:4]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3)


def test_n_completions_by_seed_differ_and_reproduce(engine):
    llm = LLM(engine)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    choices = [params.for_choice(i) for i in range(3)]
    assert [c.seed for c in choices] == [7, 8, 9]
    first = [o.output_token_ids for o in llm.generate([PROMPTS[2]] * 3, choices)]
    again = [o.output_token_ids for o in llm.generate([PROMPTS[2]] * 3, choices)]
    assert first == again and len({tuple(t) for t in first}) == 3


def test_abort_frees_the_request_and_leaves_the_others_alone(engine):
    llm = LLM(engine)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    expected = [o.output_token_ids for o in llm.generate(PROMPTS[:2], params)]
    keep, drop = (llm.add_request(p, params) for p in PROMPTS[:2])
    for _ in range(3):
        llm.step()
    used = llm.block_manager.num_used_blocks
    assert llm.abort(drop) and not llm.abort(drop)
    assert llm.block_manager.num_used_blocks < used
    final = {}
    while llm.has_unfinished():
        for output in llm.step():
            assert output.request_id != drop
            if output.finished:
                final[output.request_id] = output
    assert final[keep].output_token_ids == expected[0]
    assert llm.block_manager.num_used_blocks == 0 and llm.num_requests == 0


def test_logprobs_bounds_are_checked():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    assert math.isfinite(SamplingParams(frequency_penalty=-2.0).frequency_penalty)


def test_llmx_run_takes_the_options(engine, capsys):
    import json

    from llmx.cli.main import run_cli

    args = ["run", str(engine), "--prompt", PROMPTS[3], "--max-new-tokens", "5", "--json", "--ignore-eos"]
    assert run_cli([*args, "--n", "2", "--temperature", "1", "--seed", "3", "--logprobs", "2",
                    "--repetition-penalty", "1.3", "--min-tokens", "5"]) == 0
    records = json.loads(capsys.readouterr().out)["outputs"]
    assert [(r["index"], r["choice"]) for r in records] == [(0, 0), (0, 1)]
    assert all(r["num_output_tokens"] == 5 and len(r["logprobs"]) == 5 for r in records)
    assert all(len(lp["top"]) == 2 and isinstance(lp["token"], str) for lp in records[0]["logprobs"])
    llm = LLM(engine)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=3, repetition_penalty=1.3, min_tokens=5,
                            ignore_eos=True)
    expected = [o.output_token_ids for o in llm.generate([PROMPTS[3]] * 2, [params.for_choice(i) for i in range(2)])]
    assert [r["output_token_ids"] for r in records] == expected
    assert run_cli([*args[:-2], "--logprobs", "2"]) == 2
    assert "add --json" in capsys.readouterr().err


def test_min_tokens_holds_back_stop_strings_too(engine):
    llm = LLM(engine)
    [free] = llm.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    early = next(t for t in free.text.split() if t.strip())[:2]  # text the first tokens produce
    assert early and free.text.find(early) < len(free.text) // 2
    [stopped] = llm.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, ignore_eos=True, stop=[early]))
    assert stopped.finish_reason == "stop" and len(stopped.output_token_ids) < 8
    [held] = llm.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8, ignore_eos=True, stop=[early],
                                                       min_tokens=8))
    assert held.output_token_ids == free.output_token_ids and held.finish_reason == "length"
    assert held.text == free.text

"""The LLM API end to end on CPU: batching invariance, preemption, prefix caching, sampling, stop
strings, streaming, per-request errors."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams


def engine_for(hf_dir, tmp, dtype="float32", **build):
    ckpt = convert(hf_dir, tmp / "ckpt", dtype=dtype)
    options = dict(max_batch_size=16, max_seq_len=256, max_num_tokens=128, kv_block_size=16, device="cpu")
    options.update(build)
    return build_engine(ckpt, tmp / "engine", BuildConfig(**options)).path


@pytest.fixture(scope="module")
def smollm2_engine(tmp_path_factory):
    from helpers.smollm2 import smollm2_dir

    return engine_for(smollm2_dir(), tmp_path_factory.mktemp("smol"), max_num_tokens=96)


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return engine_for(make_tiny_hf_model("llama", tmp / "hf", dtype=torch.float32), tmp, max_seq_len=64)


def mixed_prompts(tokenizer, n=16):
    from helpers.corpus import CORPUS

    words = (CORPUS / "austen_persuasion.txt").read_text(encoding="utf-8").split()[2000:]
    return [" ".join(words[i * 37:i * 37 + 3 + (i * 7) % 41]) for i in range(n)]


@pytest.mark.slow
def test_greedy_output_is_the_same_alone_batched_and_under_preemption(smollm2_engine):
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    llm = LLM(smollm2_engine)
    prompts = mixed_prompts(llm.tokenizer)
    alone = [llm.generate([p], greedy)[0].output_token_ids for p in prompts]
    batched = [o.output_token_ids for o in llm.generate(prompts, greedy)]
    assert batched == alone
    # 12 blocks of 16 tokens cannot hold 16 sequences of up to ~80 tokens: admitted by "watermark", they preempt.
    tight = LLM(smollm2_engine, kv_cache_tokens=12 * 16, admission="watermark")
    pressured = [o.output_token_ids for o in tight.generate(prompts, greedy)]
    assert tight.stats()["num_preemptions"] > 0
    assert pressured == alone


@pytest.mark.slow
def test_prefix_cache_reuses_blocks_and_keeps_outputs(smollm2_engine):
    llm = LLM(smollm2_engine)
    shared = " ".join(["It is a truth universally acknowledged"] * 8)
    greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
    first = llm.generate([shared + " that a single man"], greedy)[0]
    second = llm.generate([shared + " that a single man"], greedy)[0]
    assert first.num_cached_prompt_tokens == 0
    assert second.num_cached_prompt_tokens >= 16
    assert second.output_token_ids == first.output_token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny_engine):
    llm = LLM(tiny_engine)
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], params)[0].output_token_ids
    others = SamplingParams(max_new_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    batched = llm.generate([[9, 9, 9], [5, 6, 7, 8], [11, 12]], [others, params, others])
    assert batched[1].output_token_ids == alone
    different_seed = llm.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=16, temperature=0.9, seed=8,
                                                               ignore_eos=True))[0]
    assert different_seed.output_token_ids != alone


def test_top_k_one_is_greedy(tiny_engine):
    llm = LLM(tiny_engine)
    greedy = llm.generate([[3, 4, 5]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    topk1 = llm.generate([[3, 4, 5]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=1,
                                                      ignore_eos=True))[0]
    assert topk1.output_token_ids == greedy.output_token_ids


def test_streamed_pieces_concatenate_to_the_final_text(tiny_engine):
    llm = LLM(tiny_engine)
    pieces, final = [], None
    for out in llm.stream(["Emma was"], SamplingParams(max_new_tokens=20, ignore_eos=True)):
        pieces.append(out.new_text)
        final = out
    assert final.finished and len(final.output_token_ids) == 20
    assert "".join(pieces) == final.text
    assert final.text == llm.tokenizer.decode(final.output_token_ids, skip_special_tokens=True)
    assert len(final.metrics.token_times) == 20 and final.metrics.ttft > 0


def test_stop_token_ids_and_stop_strings(tiny_engine):
    llm = LLM(tiny_engine)
    free = llm.generate(["Emma was"], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    stop_id = free.output_token_ids[5]
    stopped = llm.generate(["Emma was"], SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                        stop_token_ids=(stop_id,)))[0]
    first = free.output_token_ids.index(stop_id)
    assert stopped.output_token_ids == free.output_token_ids[:first + 1]
    assert stopped.finish_reason == "stop"
    needle = free.text[len(free.text) // 2:][:3]
    if needle.strip():
        cut = llm.generate(["Emma was"], SamplingParams(max_new_tokens=20, ignore_eos=True, stop=(needle,)))[0]
        assert cut.finish_reason == "stop"
        assert cut.text == free.text[:free.text.find(needle)]


def test_too_long_prompt_errors_while_others_proceed(tiny_engine):
    llm = LLM(tiny_engine)
    outs = llm.generate([[7] * 100, [7, 8, 9]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert outs[0].finish_reason == "error" and "64" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].output_token_ids) == 4


def test_max_new_tokens_is_clipped_at_max_seq_len(tiny_engine):
    llm = LLM(tiny_engine)
    out = llm.generate([[7] * 60], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 64 - 60
    assert out.finish_reason == "length"


def test_engine_without_tokenizer_takes_token_ids_and_benchmarks(tiny_engine, tmp_path):
    import shutil

    from llmx.bench.runner import BenchOptions, run_benchmark
    from llmx.common.errors import LlmxError
    from llmx.runtime.engine import TOKENIZER_MARKERS

    bare = shutil.copytree(tiny_engine, tmp_path / "bare")
    for path in bare.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")) or path.name in TOKENIZER_MARKERS:
            path.unlink()
    llm = LLM(bare)
    assert llm.tokenizer is None
    with pytest.raises(LlmxError, match="has no tokenizer"):
        llm.generate(["Emma was"])
    out = llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert len(out.output_token_ids) == 6 and out.text == ""
    report = run_benchmark(llm, BenchOptions(isl=8, osl=4, num_requests=3, warmup=0))
    assert report["metrics"]["total_output_tokens"] == 12


@pytest.mark.parametrize("kv_cache_tokens", [None, 3 * 16], ids=["roomy", "preempting"])
def test_steps_queued_ahead_give_the_outputs_of_steps_run_one_at_a_time(tiny_engine, kv_cache_tokens):
    prompts = [[(7 * i + j) % 90 + 3 for j in range(3 + i % 9)] for i in range(20)]  # 20 requests > 16 seats
    free = LLM(tiny_engine, async_steps=False).generate(prompts[:1], SamplingParams(max_new_tokens=12,
                                                                                   ignore_eos=True))[0]
    stop_id = free.output_token_ids[4]  # ends some requests mid-way, unknown until their step is read back
    params = [SamplingParams(max_new_tokens=4 + i % 13, ignore_eos=True, stop_token_ids=(stop_id,) if i % 3 else (),
                             temperature=0.8 if i % 4 == 1 else 0.0, seed=i) for i in range(len(prompts))]

    def run(async_steps):
        llm = LLM(tiny_engine, kv_cache_tokens=kv_cache_tokens, async_steps=async_steps,
                  admission="watermark" if kv_cache_tokens else "reserve")
        launches_after = []
        launch = llm.runner.launch
        llm.runner.launch = lambda work, after=None: launches_after.append(after is not None) or launch(work, after)
        outs = llm.generate(prompts, params)
        assert not llm.has_unfinished() and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
        return [(o.output_token_ids, o.finish_reason) for o in outs], sum(launches_after), llm

    in_step, ahead_count_off, _ = run(False)
    ahead, ahead_count, llm = run(True)
    assert ahead == in_step
    assert ahead_count_off == 0 and ahead_count > 0
    assert any(reason == "stop" for _, reason in ahead)
    if kv_cache_tokens:
        assert llm.stats()["num_preemptions"] > 0


def test_logits_written_into_a_given_buffer_equal_the_returned_ones(tiny_engine):
    """The decode CUDA graphs share one logits buffer through compute_logits(hidden, out)."""
    model = LLM(tiny_engine).runner.model
    hidden = torch.randn(3, model.config.hidden_size)
    buffer = torch.full((5, model.config.vocab_size), float("nan"))
    written = model.compute_logits(hidden, buffer[:3])
    assert written.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(written, model.compute_logits(hidden), rtol=0, atol=0)
    assert buffer[3:].isnan().all()

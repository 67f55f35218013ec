"""Detokenization: the fast decoder is tokenizer.decode exactly, and OutputText (lazy, or eager with stop
strings) gives the same text, piece by piece, as the incremental detokenization the engine did every step
before it became lazy (re-implemented here as the reference) -- alone, and through LLM steps over a
scripted stand-in model (LLM.over_runner), where text is worked out only when read or when stop strings
need it, and outputs read later still show their own step."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from llmx.formats.config import BuildConfig
from llmx.runtime.detokenizer import DetokenizerState, OutputText, decoder_for, detokenize_step
from llmx.runtime.engine import LLM
from llmx.runtime.model_runner import StepInputsBuilder
from llmx.runtime.sequence import SamplingParams

TEXTS = [
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition",
    "Ünïcödé — naïve café: 北京欢迎你 🙂🚀 and emoji 👩‍💻 split across byte-level tokens!",
    "def f(x):\n    return x  # code\n\n\nUser: next turn\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from helpers.smollm2 import smollm2_dir

    return AutoTokenizer.from_pretrained(str(smollm2_dir()))


def reference_pieces(tokenizer, prompt, outputs, stops=(), finished_at=None, hide_last=False):
    """The engine's per-step text before lazy detokenization: every step, tokenizer.decode over the step's
    new (visible) token, then stop strings cut and the possible beginning of one held back. Returns the new
    text of each step and the index of the step a stop string ended (or None)."""
    state = DetokenizerState.for_prompt(prompt)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    shown, pieces = "", []
    for k in range(len(outputs)):
        finished = finished_at is not None and k == finished_at
        if not (finished and hide_last):
            detokenize_step(decode, state, [outputs[k]])
        decoded = state.text
        stopped = False
        if stops and not finished:
            longest = max(len(x) for x in stops)
            hits = [i for x in stops if (i := decoded.find(x, max(0, len(shown) - longest))) >= 0]
            if hits:
                decoded, stopped = decoded[:min(hits)], True
        hold = 0 if finished or stopped or not stops else max(len(x) for x in stops) - 1
        visible = max(len(shown), len(decoded) - hold)
        pieces.append(decoded[len(shown):visible])
        shown = decoded[:visible]
        if stopped:
            return pieces, k
    return pieces, None


def test_the_fast_decoder_is_tokenizer_decode(tokenizer):
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    windows = [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 6))] for _ in range(2000)]
    windows += [w + [rng.choice(special)] for w in windows[:200]] + [[s] for s in special] + [[]]
    for text in TEXTS:
        ids = tokenizer.encode(text)
        windows += [ids[i:j] for i in range(len(ids)) for j in range(i, min(len(ids), i + 4) + 1)]
    cleaning = copy.copy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True  # takes the other fast branch (transformers' _decode)
    for tok in (tokenizer, cleaning):
        fast = decoder_for(tok)
        assert [fast(w) for w in windows] == [tok.decode(w, skip_special_tokens=True) for w in windows]


def test_a_tokenizer_of_another_kind_is_decoded_through_its_decode():
    class Letters:
        calls = 0

        def decode(self, ids, skip_special_tokens=False):
            Letters.calls += 1
            assert skip_special_tokens
            return "".join(chr(97 + i) for i in ids)

    assert decoder_for(Letters())([0, 1, 2]) == "abc" and Letters.calls == 1


@pytest.mark.parametrize("text", TEXTS)
def test_lazy_text_is_the_eager_text_whenever_and_in_whatever_order_it_is_read(tokenizer, text):
    prompt, outputs = tokenizer.encode("Once upon a time")[:6], tokenizer.encode(text)
    pieces, _ = reference_pieces(tokenizer, prompt, outputs)
    text_of = OutputText(decoder_for(tokenizer), prompt, outputs)
    assert text_of.text_between(0, len(outputs)) == "".join(pieces)
    late = OutputText(decoder_for(tokenizer), prompt, outputs)
    order = list(range(len(outputs)))
    random.Random(len(text)).shuffle(order)  # a caller holding outputs may read them in any order
    assert [late.text_between(n, n + 1) for n in order] == [pieces[n] for n in order]
    assert late.text_between(0, len(outputs)) == "".join(pieces)
    # Reading one token at a time while the sequence grows (streaming) gives the same pieces.
    growing: list[int] = []
    streamed = OutputText(decoder_for(tokenizer), prompt, growing)
    got = []
    for token in outputs:
        growing.append(token)
        got.append(streamed.text_between(len(growing) - 1, len(growing)))
    assert got == pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stops", [("clocks",), (" the", "\n\n"), ("🚀",), ("xyzzy-never",), ("e",)])
def test_stop_strings_are_checked_every_token_exactly_as_before(tokenizer, text, stops):
    prompt, outputs = tokenizer.encode("Start:"), tokenizer.encode(text)
    pieces, stop_at = reference_pieces(tokenizer, prompt, outputs, stops)
    growing: list[int] = []
    text_of = OutputText(decoder_for(tokenizer), prompt, growing, stops)
    got, got_stop = [], None
    for k, token in enumerate(outputs):
        growing.append(token)
        stopped = text_of.check_stops(len(growing), finished=False)
        got.append(text_of.text_between(k, k + 1))
        if stopped:
            got_stop = k
            break
    assert got_stop == stop_at
    assert got == pieces
    assert text_of.text_between(0, len(growing)) == "".join(pieces)


def test_a_finished_request_shows_all_its_text_and_hides_the_eos_that_ended_it(tokenizer):
    prompt, outputs = tokenizer.encode("Hello"), tokenizer.encode(" world, said the 🚀 rocket")
    eos = tokenizer.encode(" rocket")[-1]  # an ordinary token standing in for a visible EOS id
    outputs = outputs + [eos]
    last = len(outputs) - 1
    for stops in ((), ("zzz-never",)):
        pieces, _ = reference_pieces(tokenizer, prompt, outputs, stops, finished_at=last, hide_last=True)
        growing: list[int] = []
        text_of = OutputText(decoder_for(tokenizer), prompt, growing, stops)
        for k, token in enumerate(outputs):
            growing.append(token)
            if k == last:
                text_of.hide(k)
            if stops:
                text_of.check_stops(len(growing), finished=k == last)
        assert [text_of.text_between(k, k + 1) for k in range(len(outputs))] == pieces
        assert text_of.text_between(0, len(outputs)) == " world, said the 🚀 rocket"  # one " rocket", not two


def test_misuse_is_refused(tokenizer):
    outputs = tokenizer.encode(" two tokens")
    text_of = OutputText(decoder_for(tokenizer), [], outputs, ("x",))
    with pytest.raises(ValueError, match="after every token"):
        text_of.check_stops(2, finished=False)  # token 0 was never checked
    text_of.text_between(0, 1)
    with pytest.raises(ValueError, match="already detokenized"):
        text_of.hide(0)


def test_without_a_tokenizer_the_text_is_empty():
    text_of = OutputText(None, [1, 2], [3, 4, 5], ("",))
    assert text_of.text_between(0, 3) == ""
    assert OutputText(None, [1], [7], ("",)).check_stops(1, finished=False)  # "" is found at once, as before


# ---- through LLM steps ----------------------------------------------------------------------------------
BUILD = BuildConfig(max_batch_size=8, max_seq_len=512, max_num_tokens=64, kv_block_size=4)


class ScriptedRunner:
    """Stands in for ModelRunner: builds the real step inputs, then 'samples' each request's next scripted
    token (the output position follows from the step's positions, so preemption would replay correctly)."""

    def __init__(self, num_blocks: int = 512, block_size: int = 4):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.inputs = StepInputsBuilder(block_size, torch.device("cpu"))
        self.scripts: dict[int, tuple[int, list[int]]] = {}  # seq_id -> (prompt length, output tokens)
        self.released: list[int] = []

    def execute(self, work):
        inputs = self.inputs.build(work)
        out = {}
        for w in inputs.sampling:
            prompt_len, script = self.scripts[w.seq_id]
            out[w.seq_id] = script[w.start + len(w.tokens) - prompt_len]
        return out

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)


class CountingTokenizer:
    """The real tokenizer behind a wrapper that counts decode calls (and, not being a transformers
    tokenizer class, is decoded through its decode)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.eos_token_id = inner.eos_token_id

    def decode(self, ids, skip_special_tokens=False):
        self.calls += 1
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        return self.inner.encode(text)


def make_llm(tok, scripts: list[list[int]], prompts: list[list[int]], params, eos_token_ids=()):
    runner = ScriptedRunner()
    llm = LLM.over_runner(runner, BUILD, tokenizer=tok, eos_token_ids=eos_token_ids)
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    for request_id, prompt, script in zip(ids, prompts, scripts):
        runner.scripts[request_id] = (len(prompt), script)
    return llm, ids, runner


def drain(llm):
    steps = []
    while llm.has_unfinished():
        steps.append(llm.step())
    return steps


def test_text_is_the_eager_text_and_is_not_worked_out_until_read(tokenizer):
    counting = CountingTokenizer(tokenizer)
    prompts = [tokenizer.encode("Tell me a story.")] * len(TEXTS)
    scripts = [tokenizer.encode(t) for t in TEXTS]
    params = [SamplingParams(max_new_tokens=len(s), ignore_eos=True) for s in scripts]
    llm, ids, _ = make_llm(counting, scripts, prompts, params)
    steps = drain(llm)
    assert counting.calls == 0, "no text was read, so nothing was detokenized (like bench)"
    final = {o.request_id: o for outs in steps for o in outs if o.finished}
    for request_id, prompt, script in zip(ids, prompts, scripts):
        pieces, _ = reference_pieces(tokenizer, prompt, script)
        assert final[request_id].output_token_ids == script
        assert final[request_id].text == "".join(pieces)
        assert final[request_id].finish_reason == "length"
    assert counting.calls > 0


def test_streamed_pieces_are_the_eager_pieces_and_outputs_keep_their_step(tokenizer):
    prompts = [tokenizer.encode("Go:"), tokenizer.encode("Then")]
    scripts = [tokenizer.encode(TEXTS[2]), tokenizer.encode(TEXTS[0])]
    llm, ids, _ = make_llm(tokenizer, scripts, prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    history = {i: [] for i in ids}
    pieces = {i: [] for i in ids}
    for outs in drain(llm):
        for o in outs:
            pieces[o.request_id].append(o.new_text)  # read as it streams
            history[o.request_id].append(o)
    for request_id, prompt, script in zip(ids, prompts, scripts):
        expected, _ = reference_pieces(tokenizer, prompt, script[:12])
        assert pieces[request_id] == expected
        outs = history[request_id]
        # Read after the request finished, each earlier output still shows its own step.
        for n, o in enumerate(outs, start=1):
            assert o.output_token_ids == script[:n] and o.new_token_ids == [script[n - 1]]
            assert o.text == "".join(expected[:n]) and o.new_text == expected[n - 1]
            assert o.finished == (n == 12) and o.finish_reason == ("length" if n == 12 else None)
            assert o.prompt_token_ids == prompt and o.error is None and len(o.metrics.token_times) >= n


@pytest.mark.parametrize("stop", ["clocks", "🚀", " and", "never-there"])
def test_stop_strings_end_requests_at_the_same_token_with_the_same_text(tokenizer, stop):
    prompts = [tokenizer.encode("Say:")] * len(TEXTS)
    scripts = [tokenizer.encode(t) for t in TEXTS]
    params = [SamplingParams(max_new_tokens=len(s), ignore_eos=True, stop=(stop,)) for s in scripts]
    llm, ids, runner = make_llm(tokenizer, scripts, prompts, params)
    streamed = {i: [] for i in ids}
    final = {}
    for outs in drain(llm):
        for o in outs:
            streamed[o.request_id].append(o.new_text)
            if o.finished:
                final[o.request_id] = o
    for request_id, prompt, script in zip(ids, prompts, scripts):
        pieces, stop_at = reference_pieces(tokenizer, prompt, script, (stop,), finished_at=len(script) - 1)
        out = final[request_id]
        assert streamed[request_id] == pieces
        assert out.text == "".join(pieces)
        assert len(out.output_token_ids) == (stop_at + 1 if stop_at is not None else len(script))
        assert out.finish_reason == ("stop" if stop_at is not None else "length")
    assert sorted(runner.released) == sorted(ids)


def test_the_eos_that_ends_a_request_is_not_text_and_errors_come_back(tokenizer):
    words = tokenizer.encode(" one two three")
    (eos,) = tokenizer.encode(" halt")  # an ordinary word as EOS id, so that showing it would show
    script = words + [eos] + words
    llm, ids, _ = make_llm(tokenizer, [script, script], [tokenizer.encode("Count:"), [5] * 600],
                           SamplingParams(max_new_tokens=20), eos_token_ids=(eos,))
    outs = {o.request_id: o for step in drain(llm) for o in step if o.finished}
    done, failed = outs[ids[0]], outs[ids[1]]
    assert done.finish_reason == "eos" and done.output_token_ids == words + [eos]
    assert done.text == tokenizer.decode(words, skip_special_tokens=True)
    assert failed.finish_reason == "error" and "512" in failed.error
    assert failed.text == "" and failed.output_token_ids == [] and failed.new_token_ids == []

"""`llmx serve` as a live process on a tiny model, driven by the real openai client and by raw HTTP:
completions and chat (plain, streamed, n, logprobs, echo), greedy output equal to `llmx run`, 64 concurrent
streams, disconnects that free the KV cache, bad requests, /metrics, the queue limit and SIGTERM under load."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmx.cli.main import run_cli

openai = pytest.importorskip("openai", reason="the serve tests need the dev extra (openai)")
parser = pytest.importorskip("prometheus_client.parser", reason="the serve tests need the serve extra")

KEY = "test-key"
MODEL = "tiny"
BUILD = ["--device", "cpu", "--max-seq-len", "128", "--max-batch-size", "16", "--max-num-tokens", "64"]
PROMPT = "It was a truth universally acknowledged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `llmx serve` subprocess on a free port, up once /health answers 200."""

    def __init__(self, engine: Path, *extra: str, log: Path):
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "llmx", "serve", str(engine), "--port", str(self.port),
               "--served-model-name", MODEL, "--api-key", KEY, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early: {log.read_text()}"
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not come up: {log.read_text()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}",
                                                           "Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path, timeout=5)

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        status, body = self.request("POST", path, json.dumps(payload).encode())
        return status, json.loads(body)

    def metrics(self) -> dict[str, float]:
        status, body = self.get("/metrics")
        assert status == 200
        return {sample.name: sample.value for family in parser.text_string_to_metric_families(body.decode())
                for sample in family.samples}

    def client(self, cls=None):
        return (cls or openai.OpenAI)(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    from helpers.tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("serve")
    hf = make_tiny_hf_model("llama", root / "hf")
    assert run_cli(["convert", str(hf), "-o", str(root / "ckpt")]) == 0
    assert run_cli(["build", str(root / "ckpt"), "-o", str(root / "engine"), *BUILD]) == 0
    return root / "engine"


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    srv = Server(engine, log=tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


def wait_for_idle_kv(server: Server, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["llmx_kv_cache_usage_ratio"] == 0 and m["llmx_requests_running"] == 0:
            return m
        assert time.monotonic() < deadline, f"KV cache still in use: {m}"
        time.sleep(0.1)


def test_completions_plain_and_streamed_agree(server):
    client = server.client()
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    [choice] = plain.choices
    assert choice.finish_reason in ("length", "stop") and plain.model == MODEL
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 5
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_chat_plain_and_streamed_agree_over_several_turns(server):
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Emma?"},
                {"role": "assistant", "content": "A young woman."}, {"role": "user", "content": "And Harriet?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    message = plain.choices[0].message
    assert message.role == "assistant" and plain.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_greedy_output_equals_llmx_run(server, engine, capsys):
    assert run_cli(["run", str(engine), "--prompt", PROMPT, "--max-new-tokens", "10", "--json"]) == 0
    [expected] = json.loads(capsys.readouterr().out)["outputs"]
    got = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert got.choices[0].text == expected["text"]
    assert got.usage.completion_tokens == expected["num_output_tokens"]
    assert got.usage.prompt_tokens == expected["num_prompt_tokens"]


def test_n_seed_stop_penalties_and_logprobs(server):
    client = server.client()
    sampled = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3,
                                        extra_body={"ignore_eos": True})
    texts = [c.text for c in sorted(sampled.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3 and sampled.usage.completion_tokens == 24
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=3,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[3:5]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == greedy[:greedy.index(stop)]
    penalized = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={"ignore_eos": True, "repetition_penalty": 5.0})
    assert penalized.choices[0].text != greedy
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3, n=2)
    for choice in chat.choices:
        content = choice.logprobs.content
        assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
        assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy


def test_echo_logprobs_score_a_prompt_as_lm_eval_asks(server):
    """lm-eval's loglikelihood: token-id prompts, echo, logprobs=1, max_tokens 0 or 1."""
    client = server.client()
    ids = [1, 40, 51, 72, 33, 90, 12, 61]
    generated = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=1,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    logprobs = generated.choices[0].logprobs
    continuation = [int(t.removeprefix("token_id:")) for t in logprobs.tokens]
    full = ids + continuation
    for max_tokens in (0, 1):
        scored = client.completions.create(model=MODEL, prompt=[full, ids], max_tokens=max_tokens, temperature=0,
                                           logprobs=1, echo=True)
        first, second = sorted(scored.choices, key=lambda c: c.index)
        tl = first.logprobs.token_logprobs
        assert len(tl) == len(full) + max_tokens and tl[0] is None and first.logprobs.top_logprobs[0] is None
        assert tl[len(ids):len(full)] == pytest.approx(logprobs.token_logprobs, abs=1e-4)
        assert len(second.logprobs.token_logprobs) == len(ids) + max_tokens
        # A greedy continuation is the likeliest token at every position.
        for value, top in zip(tl[len(ids):len(full)], first.logprobs.top_logprobs[len(ids):len(full)]):
            assert value == pytest.approx(max(top.values()))
        assert scored.usage.prompt_tokens == len(full) + len(ids)
        assert scored.usage.completion_tokens == 2 * max_tokens


def test_64_concurrent_streams_complete_with_exact_usage(server):
    client = server.client(openai.AsyncOpenAI)
    prompts = [f"{PROMPT} {i}" for i in range(64)]

    async def one(prompt: str, max_tokens: int):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    async def all_of():
        return await asyncio.gather(*(one(p, 2 + i % 5) for i, p in enumerate(prompts)))

    results = asyncio.run(all_of())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server_engine_dir(server)))
    for i, (text, usage) in enumerate(results):
        assert usage.completion_tokens == 2 + i % 5
        assert usage.prompt_tokens == len(tokenizer.encode(prompts[i]))
    wait_for_idle_kv(server)


def server_engine_dir(server: Server) -> Path:
    return Path(server.proc.args[4])


def finished_by_reason(server: Server) -> dict[str, float]:
    families = parser.text_string_to_metric_families(server.get("/metrics")[1].decode())
    return {s.labels["finish_reason"]: s.value for f in families if f.name == "llmx_requests_finished"
            for s in f.samples if s.name.endswith("_total")}


def test_a_client_that_disconnects_frees_its_kv_blocks(server):
    aborted = finished_by_reason(server).get("abort", 0)
    # 8 choices of 100 tokens: the batch is busy for a while, so the disconnect comes mid-generation.
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True,
                       "n": 8, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    response.readline()  # the first event: the requests are running
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for_aborts(server, aborted)
    # A plain (not streamed) request whose client leaves once it runs is aborted too.
    plain = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "n": 16,
                        "ignore_eos": True}).encode()
    aborted = finished_by_reason(server)["abort"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=plain, headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 20
    while server.metrics()["llmx_requests_running"] == 0:
        assert time.monotonic() < deadline, "the request never ran"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for_aborts(server, aborted)


def wait_for_aborts(server: Server, before: float, timeout: float = 20) -> None:
    """Until more requests than `before` were aborted, and the KV cache is free again."""
    deadline = time.monotonic() + timeout
    while finished_by_reason(server).get("abort", 0) <= before:
        assert time.monotonic() < deadline, "the disconnected request was not aborted"
        time.sleep(0.1)
    wait_for_idle_kv(server)


BAD_REQUESTS = [
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 400, "model"),
    ("prompt too long", "/v1/completions", {"model": MODEL, "prompt": "word " * 300}, 400, "prompt"),
    ("max_tokens past the context", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 500}, 400,
     "max_tokens"),
    ("negative max_tokens", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("non-numeric temperature", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400,
     "temperature"),
    ("negative top_p", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": -0.5}, 400, "top_p"),
    ("logprobs too many", "/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("empty messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,payload,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, name, path, payload, status, param):
    got, body = server.post(path, payload)
    assert got == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert server.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})[0] == 200


def test_malformed_bodies_and_api_keys(server):
    for raw, words in ((b'{"model": "tiny", "prompt": ', "not valid JSON"), (b'{"prompt": "\xff\xfe"}', "UTF-8"),
                       (b'[1, 2]', "JSON object")):
        status, body = server.request("POST", "/v1/completions", raw)
        assert status == 400 and words in json.loads(body)["error"]["message"]
    status, body = server.request("POST", "/v1/completions", b"{}", headers={"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    assert server.get("/health")[0] == 200  # health and metrics need no key
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="other", prompt="x")


def test_metrics_parse_and_count(server):
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    families = {f.name: f for f in parser.text_string_to_metric_families(server.get("/metrics")[1].decode())}
    for name in ("llmx_requests_running", "llmx_requests_waiting", "llmx_kv_cache_usage_ratio",
                 "llmx_prefix_cache_hit_tokens", "llmx_preemptions", "llmx_prompt_tokens", "llmx_generation_tokens",
                 "llmx_time_to_first_token_seconds", "llmx_time_per_output_token_seconds",
                 "llmx_e2e_request_latency_seconds", "llmx_requests_finished"):
        assert name in families, sorted(families)
    m = server.metrics()
    assert m["llmx_generation_tokens_total"] >= 3 and m["llmx_time_to_first_token_seconds_count"] >= 1


def test_queue_limit_answers_429_and_sigterm_under_load_exits_cleanly(engine, tmp_path):
    srv = Server(engine, "--max-queue", "2", "--grace-period", "3", log=tmp_path / "server.log")
    try:
        async def one(client, i):
            try:
                stream = await client.completions.create(model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=100,
                                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
                async for _ in stream:
                    pass
                return "done"
            except openai.RateLimitError:
                return 429
            except (openai.APIConnectionError, openai.APIError):
                return "cut"

        async def load():
            client = srv.client(openai.AsyncOpenAI)
            tasks = [asyncio.create_task(one(client, i)) for i in range(24)]
            deadline = time.monotonic() + 30
            while srv.metrics()["llmx_requests_running"] < 16 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

        outcomes = asyncio.run(load())
        assert outcomes.count(429) == 6, outcomes  # 16 seats + 2 queued take 18 of the 24
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "server stopped" in log


def test_an_engine_without_tokenizer_serves_token_ids_and_is_benchmarked_through_them(tmp_path, capsys):
    """A bare config.json with dummy weights (how peers' tables are measured): no text, so each chunk carries
    `token_ids` when asked, and `llmx bench --endpoint` times tokens by them."""
    from helpers.tiny_models import make_tiny_hf_model

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((make_tiny_hf_model("llama", tmp_path / "hf") / "config.json").read_text())
    assert run_cli(["convert", str(bare), "-o", str(tmp_path / "ckpt"), "--dummy-weights"]) == 0
    assert run_cli(["build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "engine"), *BUILD]) == 0
    srv = Server(tmp_path / "engine", log=tmp_path / "server.log")
    try:
        status, body = srv.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True,
                                                    "return_token_ids": True})
        assert status == 200 and len(body["choices"][0]["token_ids"]) == 5, body
        status, body = srv.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True})
        assert status == 200 and "token_ids" not in body["choices"][0]
        args = ["bench", str(tmp_path / "engine"), "--endpoint", f"http://127.0.0.1:{srv.port}/v1", "--api-key", KEY,
                "--isl", "8", "--osl", "4", "--num-requests", "4", "--warmup", "0", "--json", "-"]
        capsys.readouterr()
        assert run_cli(args) == 0
        m = json.loads(capsys.readouterr().out)["metrics"]
        assert m["completed_requests"] == 4 and m["failed_requests"] == 0 and m["total_output_tokens"] == 16
        assert m["tpot_ms"]["p50"] > 0
    finally:
        assert srv.stop() == 0, srv.log.read_text()


@pytest.mark.parametrize("load", [["--concurrency", "4"], ["--request-rate", "50"]], ids=["concurrency", "rate"])
def test_llmx_bench_endpoint_measures_the_live_server(server, engine, load, capsys, tmp_path):
    args = ["bench", str(engine), "--endpoint", f"http://127.0.0.1:{server.port}/v1", "--api-key", KEY, "--isl", "8",
            "--osl", "4", "--num-requests", "8", "--warmup", "1", "--json", "-", *load]
    assert run_cli(args) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["metrics"]
    assert m["completed_requests"] == 8 and m["failed_requests"] == 0
    assert m["total_input_tokens"] == 64 and m["total_output_tokens"] == 32
    assert m["ttft_ms"]["p50"] > 0 and m["itl_ms"]["p50"] >= 0 and m["output_throughput_tok_s"] > 0
    assert report["engine"]["model"] == MODEL and report["config"]["endpoint"].endswith("/v1")
    # --baseline-metric reaches the endpoint gate: an impossible throughput fails, the other metrics are not read
    impossible = tmp_path / "impossible.json"
    report["metrics"]["output_throughput_tok_s"] *= 1000
    impossible.write_text(json.dumps(report))
    gated = [a for a in args if a not in ("--json", "-")]
    assert run_cli([*gated, "--baseline", str(impossible), "--baseline-metric", "output_throughput_tok_s"]) == 1
    assert "1 metric(s) regressed" in capsys.readouterr().err
    wrong = run_cli(["bench", str(engine), "--endpoint", f"http://127.0.0.1:{server.port}/v1", "--api-key", "bad",
                     "--isl", "8", "--osl", "2", "--num-requests", "2", "--warmup", "0", "--model", MODEL])
    assert wrong == 2 and "HTTP 401" in capsys.readouterr().err


def test_lm_eval_local_completions_scores_a_local_task_through_the_server(server, engine, tmp_path, monkeypatch):
    """lm-evaluation-harness's `local-completions` model on a multiple-choice task from a local YAML + JSONL:
    its per-choice log-likelihoods equal the engine's own scoring of the same tokens."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from llmx.runtime.engine import LLM

    rows = [{"question": "Emma Woodhouse, handsome, clever, and", "choices": [" rich", " poor", " tall"], "answer": 0},
            {"question": "She was the youngest of the two", "choices": [" sons", " daughters"], "answer": 1},
            {"question": "Her mother had died too long", "choices": [" ago", " since", " before"], "answer": 0}]
    data = tmp_path / "tiny_choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = get_model("local-completions").create_from_arg_string(
        f"model={MODEL},base_url=http://127.0.0.1:{server.port}/v1/completions,tokenizer={engine},"
        "tokenized_requests=True,num_concurrent=2,max_retries=1")
    results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], task_manager=TaskManager(
        include_path=str(tmp_path)), log_samples=True, batch_size=4)
    acc = results["results"]["tiny_choice"]["acc,none"]
    llm = LLM(engine)
    correct = 0
    for sample in results["samples"]["tiny_choice"]:
        scores = []
        for (context, continuation), [(loglikelihood, _)] in zip([a for a in sample["arguments"]], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            expected = sum(llm.runner.score(ctx + cont).tolist()[len(ctx) - 1:])
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
            scores.append(expected)
        correct += scores.index(max(scores)) == sample["doc"]["answer"]
    assert acc == pytest.approx(correct / len(rows))


def test_smollm2_chat_through_the_server_equals_the_engine_in_process(tmp_path):
    """The real SmolLM2-135M-Instruct: its chat template over several turns, byte-level BPE text streamed."""
    from helpers.smollm2 import smollm2_dir

    from llmx.runtime.engine import LLM
    from llmx.runtime.sequence import SamplingParams

    assert run_cli(["convert", str(smollm2_dir()), "-o", str(tmp_path / "ckpt")]) == 0
    assert run_cli(["build", str(tmp_path / "ckpt"), "-o", str(tmp_path / "engine"), "--device", "cpu",
                    "--max-seq-len", "256", "--max-batch-size", "4", "--max-num-tokens", "256"]) == 0
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    llm = LLM(tmp_path / "engine")
    [expected] = llm.generate([llm.encode_chat(messages)], SamplingParams(max_new_tokens=20))
    assert expected.text.strip()
    srv = Server(tmp_path / "engine", log=tmp_path / "server.log")
    try:
        client = srv.client()
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
        assert plain.choices[0].message.content == expected.text
        assert plain.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert plain.usage.completion_tokens == len(expected.output_token_ids)
        assert plain.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
        chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    finally:
        assert srv.stop() == 0

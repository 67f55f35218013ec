"""`llmx bench --endpoint`: the benchmark's requests sent to an OpenAI-compatible server, timed by the client.

Each request is a streamed `/v1/completions` call with the prompt as token ids, `max_tokens` = its output
length, greedy, `ignore_eos` (llmx, vLLM and SGLang honour it) and `stream_options.include_usage`. Times are
the client's (time.perf_counter): arrival = when the request is sent (with --request-rate: its scheduled
Poisson time), one timestamp per streamed chunk that carries text (TTFT = first chunk - arrival, ITL = gaps
between chunks), finish = the end of the stream; the output length is the server's `usage.completion_tokens`.

The HTTP client is a small asyncio one (HTTP/1.1, one connection per request, chunked or plain bodies), so
the benchmark needs no HTTP library and its own overhead per chunk stays small.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from llmx.bench.driver import RequestRecord, poisson_arrival_offsets
from llmx.bench.metrics import compute_metrics
from llmx.bench.report import build_report, environment_description
from llmx.bench.runner import make_requests, report_config
from llmx.bench.workload import BenchRequest
from llmx.common.errors import LlmxError

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.


class EndpointError(Exception):
    """A request the server answered with an error (status and its message)."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None
    api_key: str | None = None

    def __post_init__(self):
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LlmxError(f"--endpoint {self.base_url}: give the server's base URL, e.g. http://127.0.0.1:8000/v1.")

    async def request(self, method: str, path: str, payload: dict | None = None) -> AsyncIterator[bytes]:
        """The response body of one call, piece by piece (EndpointError on a status other than 200)."""
        parts = urlsplit(self.base_url.rstrip("/") + path)
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        try:
            reader, writer = await asyncio.open_connection(parts.hostname, port,
                                                           ssl=ssl.create_default_context() if https else None)
        except OSError as exc:
            raise EndpointError(f"cannot connect to {parts.hostname}:{port} ({exc.strerror or exc})") from exc
        try:
            body = b"" if payload is None else json.dumps(payload).encode()
            headers = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
                       "Accept: text/event-stream, application/json", f"Content-Length: {len(body)}"]
            if payload is not None:
                headers.append("Content-Type: application/json")
            if self.api_key:
                headers.append(f"Authorization: Bearer {self.api_key}")
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
            await writer.drain()
            status_line = await reader.readline()
            status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
            chunked = False
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                chunked |= name.strip().lower() == "transfer-encoding" and "chunked" in value.lower()
            pieces = _chunks(reader) if chunked else _until_eof(reader)
            if status != 200:
                text = b"".join([p async for p in pieces]).decode("utf-8", "replace")
                raise EndpointError(f"HTTP {status}: {_error_message(text)}")
            async for piece in pieces:
                yield piece
        finally:
            writer.close()

    async def json(self, method: str, path: str, payload: dict | None = None) -> Any:
        return json.loads(b"".join([p async for p in self.request(method, path, payload)]))

    async def events(self, path: str, payload: dict) -> AsyncIterator[dict]:
        """The server-sent events of a streamed call, as decoded JSON, until [DONE]."""
        buffer = b""
        async for piece in self.request("POST", path, payload):
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    decoded = json.loads(data)
                    if "error" in decoded:
                        raise EndpointError(_error_message(data.decode()))
                    yield decoded


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        yield await reader.readexactly(size)
        await reader.readline()  # the CRLF after each chunk


async def _until_eof(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while piece := await reader.read(65536):
        yield piece


def _error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return text.strip()[:300]


async def served_model(endpoint: Endpoint) -> str:
    """The first model /v1/models lists (the one to benchmark when --model is not given)."""
    try:
        listing = await endpoint.json("GET", "/models")
        return listing["data"][0]["id"]
    except (EndpointError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise LlmxError(f"--endpoint {endpoint.base_url}: could not read the served model from /v1/models ({exc}); "
                        "name it with --model.") from exc


async def _send(endpoint: Endpoint, model: str, request: BenchRequest, record: RequestRecord,
                clock: Callable[[], float]) -> None:
    payload = {"model": model, "prompt": list(request.prompt_token_ids), "max_tokens": request.output_len,
               "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
               "return_token_ids": True}
    usage = None
    try:
        async for event in endpoint.events("/completions", payload):
            now = clock()
            # a chunk that carries text or token ids (servers that know `return_token_ids`, as llmx and vLLM
            # do, send ids even where the text is empty, e.g. an engine built without a tokenizer)
            if any(choice.get("text") or choice.get("token_ids") for choice in event.get("choices") or ()):
                record.token_times.append(now)
            usage = event.get("usage") or usage
    except (EndpointError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
        record.error = str(exc) or type(exc).__name__
    record.finish = clock()
    if record.error is None:
        record.output_len = usage["completion_tokens"] if usage else len(record.token_times)
        if not record.token_times:
            record.error = "the stream carried no text or token ids"


async def drive_endpoint(endpoint: Endpoint, model: str, requests: list[BenchRequest], *,
                         concurrency: int | None = None, request_rate: float | None = None, seed: int = 0,
                         clock: Callable[[], float] = time.perf_counter) -> list[RequestRecord]:
    """Send `requests` with at most `concurrency` in flight (default all), or at Poisson times of `request_rate`
    req/s; one record per request, in request order."""
    records = [RequestRecord(input_len=r.input_len) for r in requests]
    offsets = poisson_arrival_offsets(len(requests), request_rate, seed) if request_rate is not None else None
    seats = asyncio.Semaphore(concurrency or len(requests) or 1)
    start = clock()

    async def one(i: int) -> None:
        if offsets is not None:
            await asyncio.sleep(max(0.0, start + offsets[i] - clock()))
        async with seats:
            records[i].arrival = start + offsets[i] if offsets is not None else clock()
            await _send(endpoint, model, requests[i], records[i], clock)

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return records


def workload_source(engine_dir) -> Any:
    """What make_requests reads of an LLM (tokenizer, model config, max_seq_len), from an engine directory
    without loading its weights: the prompts sent to the server are those the in-process bench would run."""
    from types import SimpleNamespace

    from llmx.formats.engine_dir import read_engine
    from llmx.runtime.engine import _load_tokenizer

    engine = read_engine(engine_dir)
    return SimpleNamespace(engine=engine, tokenizer=_load_tokenizer(engine.path), max_seq_len=engine.build.max_seq_len)


def run_endpoint_benchmark(endpoint: Endpoint, engine_dir, options, *, recipe: str | None = None) -> dict[str, Any]:
    """Warm up, measure, and return the `llmx-bench/1` report of a server (options: bench.runner.BenchOptions)."""
    requests, warmup = make_requests(workload_source(engine_dir), options)

    async def measure() -> tuple[str, list[RequestRecord]]:
        model = endpoint.model or await served_model(endpoint)
        if warmup:
            await drive_endpoint(endpoint, model, warmup, concurrency=options.concurrency)
        return model, await drive_endpoint(endpoint, model, requests, concurrency=options.concurrency,
                                           request_rate=options.request_rate, seed=options.seed)

    model, records = asyncio.run(measure())
    failed = [r for r in records if r.error]
    if failed:
        raise LlmxError(f"{len(failed)} of {len(records)} requests to {endpoint.base_url} failed (first: "
                        f"{failed[0].error}); the figures would be wrong, so none are reported.")
    config = report_config(options, recipe) | {"endpoint": endpoint.base_url, "model": model}
    described = {"path": endpoint.base_url, "endpoint": endpoint.base_url, "model": model,
                 "workload_from": str(engine_dir)}
    environment = environment_description({"device": "client", "device_name": None})
    return build_report(engine=described, config=config, metrics=compute_metrics(records), environment=environment)

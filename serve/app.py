"""The HTTP routes: /v1/completions, /v1/chat/completions (plain and streamed), /v1/models, /health, /metrics.

A request is validated (400 with OpenAI's error object naming the field), checked against the queue limit
(429), split into engine requests (its prompts times n) and answered from their Pieces. A client that goes
away aborts its engine requests, which frees their KV blocks at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmx.common.errors import LlmxError
from llmx.runtime.sequence import SamplingParams
from llmx.serve import protocol, responses
from llmx.serve.engine_loop import EngineLoop, Piece
from llmx.serve.errors import ApiError, bad_request
from llmx.serve.metrics import CONTENT_TYPE, ServerMetrics

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


@dataclass
class ServeState:
    llm: object  # runtime.engine.LLM, touched here only for its tokenizer and limits (read-only)
    engine: EngineLoop
    metrics: ServerMetrics
    model_name: str
    api_key: str | None
    max_queue: int
    active: int = 0  # engine requests accepted and not yet answered

    @property
    def capacity(self) -> int:
        """Engine requests the server holds at once: a full batch plus the queue."""
        return self.llm.scheduler.max_num_seqs + self.max_queue


def create_app(state: ServeState, lifespan=None) -> Starlette:
    routes = [
        Route("/v1/completions", _endpoint(state, completions), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(state, chat_completions), methods=["POST"]),
        Route("/v1/models", _endpoint(state, models), methods=["GET"]),
        Route("/health", lambda request: health(state), methods=["GET"]),
        Route("/metrics", lambda request: Response(state.metrics.render(), media_type=CONTENT_TYPE),
              methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


def _endpoint(state: ServeState, handler):
    async def endpoint(request: Request) -> Response:
        _check_api_key(state, request)
        return await handler(state, request)
    return endpoint


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code)


def _check_api_key(state: ServeState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "Missing or wrong API key: send `Authorization: Bearer KEY` with the server's key.",
                       code="invalid_api_key")


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                          f"{exc.colno}.") from None


def health(state: ServeState) -> Response:
    if state.engine.healthy:
        return JSONResponse({"status": "ok"})
    reason = state.engine.failure or "the server is stopping"
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


async def models(state: ServeState, request: Request) -> Response:
    card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "llmx",
            "max_model_len": state.llm.max_seq_len}
    return JSONResponse({"object": "list", "data": [card]})


def _check_model(state: ServeState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(400, f"The model '{model}' does not exist here; this server serves '{state.model_name}'.",
                       param="model", code="model_not_found")


# ---- one HTTP call = several engine requests ------------------------------------------------------------------
class _Call:
    """The engine requests of one HTTP call (prompts x n choices), all reporting to one queue."""

    def __init__(self, state: ServeState, jobs: list[tuple[list[int], SamplingParams]]):
        if not state.engine.healthy:
            raise ApiError(503, "The server is not taking requests (stopping, or its engine failed).",
                           type="server_error")
        if state.active + len(jobs) > state.capacity:
            raise ApiError(429, f"The server holds {state.active} requests and takes at most {state.capacity} "
                           "(the batch plus --max-queue); retry later.", type="rate_limit_error",
                           code="queue_full")
        self.state = state
        self.queue: asyncio.Queue = asyncio.Queue()
        state.active += len(jobs)
        self.handles = [state.engine.submit(ids, params, self.queue, i) for i, (ids, params) in enumerate(jobs)]
        self._open = set(range(len(jobs)))

    async def pieces(self) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) until every request finished; an engine-side refusal raises its ApiError."""
        while self._open:
            index, piece = await self.queue.get()
            if piece.finish_reason == "error":
                raise ApiError(400, piece.error or "the request could not be served", type="invalid_request_error")
            if piece.finish_reason == "abort":
                raise ApiError(503, piece.error or "the request was aborted", type="server_error")
            if piece.finished:
                self._open.discard(index)
            yield index, piece

    def close(self) -> None:
        """Abort whatever is unfinished (the client left, or an error ended the call) and give the seats back."""
        if self.state is None:
            return
        for handle in self.handles:
            self.state.engine.abort(handle)
        self.state.active -= len(self.handles)
        self.state = None


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(call: _Call, request: Request, num_choices: int) -> list[responses.Choice]:
    """Every choice's whole output; a client that disconnects first aborts them."""
    choices = [responses.Choice() for _ in range(num_choices)]

    async def gather() -> None:
        async for index, piece in call.pieces():
            choices[index].add(piece)

    work = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
        call.close()
    if work.cancelled():
        raise ApiError(499, "client disconnected")
    work.result()  # re-raises an ApiError from the engine
    return choices


def _streaming(call: _Call, events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except ApiError as exc:
            yield responses.sse(exc.body())
        finally:
            call.close()
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- /v1/completions ------------------------------------------------------------------------------------------
async def completions(state: ServeState, request: Request) -> Response:
    req = protocol.parse(protocol.CompletionRequest, await _json_body(request))
    _check_model(state, req.model)
    protocol.check_unsupported(req)
    llm = state.llm
    given = protocol.completion_prompts(req.prompt)
    prompts = [_encode_prompt(llm, p) for p in given]
    score_only = req.echo and req.max_tokens == 0  # loglikelihood: the prompt's log-probabilities only
    jobs = []
    for ids in prompts:
        budget = protocol.token_budget(len(ids), None if score_only else req.max_tokens,
                                       COMPLETION_DEFAULT_MAX_TOKENS, llm.max_seq_len, "max_tokens")
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("'max_tokens' must be at least 1 (0 only with echo).", param="max_tokens")
        params = protocol.sampling_params(req, max_new_tokens=1 if score_only else budget, logprobs=req.logprobs,
                                          prompt_logprobs=req.logprobs if req.echo else None)
        jobs += [(ids, params.for_choice(j)) for j in range(req.n)]
    call = _Call(state, jobs)
    rid = responses.request_id("cmpl")
    text_of = responses.TokenText(llm.tokenizer, req.return_tokens_as_token_ids)
    echoes = [(p if isinstance(p, str) else _decode(llm, ids)) if req.echo else "" for p, ids in zip(given, prompts)]
    if req.stream:
        return _streaming(call, _completion_events(call, req, rid, state.model_name, prompts, echoes, text_of,
                                                   score_only))
    choices = await _collect(call, request, len(jobs))
    out = []
    for i, choice in enumerate(choices):
        ids = prompts[i // req.n]
        if score_only:
            choice.text, choice.token_ids, choice.logprobs = "", [], []
        logprobs = None
        if req.logprobs is not None:
            logprobs = responses.completion_logprobs(choice.logprobs, text_of)
            if req.echo:
                logprobs = responses.join_logprobs(responses.echo_logprobs(ids, choice.prompt_logprobs, text_of),
                                                   logprobs)
        out.append({"index": i, "text": echoes[i // req.n] + choice.text, "logprobs": logprobs,
                    "finish_reason": choice.finish_reason})
        if req.return_token_ids:
            out[-1]["token_ids"] = list(choice.token_ids)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    body = responses.envelope("text_completion", rid, state.model_name, out,
                              usage=responses.usage(sum(map(len, prompts)), completion_tokens))
    return JSONResponse(body)


async def _completion_events(call: _Call, req, rid: str, model: str, prompts: list[list[int]], echoes: list[str],
                             text_of, score_only: bool) -> AsyncIterator[str]:
    started: set[int] = set()
    completion_tokens = 0
    async for index, piece in call.pieces():
        text, entries = piece.text, piece.logprobs or []
        if score_only:
            text, entries, piece.token_ids = "", [], []
        completion_tokens += len(piece.token_ids)
        logprobs = None if req.logprobs is None else responses.completion_logprobs(entries, text_of)
        if index not in started:
            started.add(index)
            ids = prompts[index // req.n]
            text = echoes[index // req.n] + text
            if req.echo and logprobs is not None:
                logprobs = responses.join_logprobs(responses.echo_logprobs(ids, piece.prompt_logprobs, text_of),
                                                   logprobs)
        if not text and not piece.finished and not (req.return_token_ids and piece.token_ids):
            continue
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": piece.finish_reason}
        if req.return_token_ids:
            choice["token_ids"] = list(piece.token_ids)
        yield responses.sse(responses.envelope("text_completion", rid, model, [choice]))
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = responses.usage(sum(map(len, prompts)), completion_tokens)
        yield responses.sse(responses.envelope("text_completion", rid, model, [], usage=usage))
    yield responses.sse("[DONE]")


# ---- /v1/chat/completions -------------------------------------------------------------------------------------
async def chat_completions(state: ServeState, request: Request) -> Response:
    req = protocol.parse(protocol.ChatCompletionRequest, await _json_body(request))
    _check_model(state, req.model)
    protocol.check_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    llm = state.llm
    try:
        ids = llm.encode_chat(protocol.chat_messages(req))
    except LlmxError as exc:
        raise bad_request(exc.message, param="messages") from None
    except Exception as exc:  # the model's template refuses the conversation (e.g. roles out of order)
        raise bad_request(f"The chat template cannot render these messages: {exc}", param="messages") from None
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested == 0:
        raise bad_request(f"'{param}' must be at least 1.", param=param)
    budget = protocol.token_budget(len(ids), requested, None, llm.max_seq_len, param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = protocol.sampling_params(req, max_new_tokens=budget, logprobs=logprobs)
    call = _Call(state, [(ids, params.for_choice(j)) for j in range(req.n)])
    rid = responses.request_id("chatcmpl")
    text_of = responses.TokenText(llm.tokenizer, req.return_tokens_as_token_ids)
    if req.stream:
        return _streaming(call, _chat_events(call, req, rid, state.model_name, len(ids), text_of))
    choices = await _collect(call, request, req.n)
    out = [{"index": i, "message": {"role": "assistant", "content": c.text},
            "logprobs": responses.chat_logprobs(c.logprobs, text_of) if req.logprobs else None,
            "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
    body = responses.envelope("chat.completion", rid, state.model_name, out,
                              usage=responses.usage(len(ids), sum(len(c.token_ids) for c in choices)))
    return JSONResponse(body)


async def _chat_events(call: _Call, req, rid: str, model: str, num_prompt_tokens: int,
                       text_of) -> AsyncIterator[str]:
    kind = "chat.completion.chunk"
    for i in range(req.n):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield responses.sse(responses.envelope(kind, rid, model, [role]))
    completion_tokens = 0
    async for index, piece in call.pieces():
        completion_tokens += len(piece.token_ids)
        if not piece.text and not piece.finished:
            continue
        logprobs = responses.chat_logprobs(piece.logprobs or [], text_of) if req.logprobs else None
        choice = {"index": index, "delta": {"content": piece.text} if piece.text else {}, "logprobs": logprobs,
                  "finish_reason": piece.finish_reason}
        yield responses.sse(responses.envelope(kind, rid, model, [choice]))
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = responses.usage(num_prompt_tokens, completion_tokens)
        yield responses.sse(responses.envelope(kind, rid, model, [], usage=usage))
    yield responses.sse("[DONE]")


# ---- prompts --------------------------------------------------------------------------------------------------
def _encode_prompt(llm, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        vocab = llm.engine.model.vocab_size if llm.engine is not None else None
        if vocab is not None and any(t >= vocab for t in prompt):
            raise bad_request(f"'prompt' holds a token id outside the vocabulary (size {vocab}).", param="prompt")
        return list(prompt)
    if llm.tokenizer is None:
        raise bad_request("This engine has no tokenizer: send the prompt as token ids.", param="prompt")
    ids = llm.tokenizer.encode(prompt)
    if not ids:
        raise bad_request("'prompt' is empty: it encodes to no tokens.", param="prompt")
    return ids


def _decode(llm, ids: list[int]) -> str:
    return llm.tokenizer.decode(ids) if llm.tokenizer is not None else ""

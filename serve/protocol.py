"""The OpenAI request bodies the server accepts, and their translation into the runtime's SamplingParams.

Validation happens here, at the edge: a value of the wrong type or out of range becomes a 400 naming the field
(`param`), so the engine only ever sees requests it can serve. Fields OpenAI defines that do not change the
output (`user`, `service_tier`, ...) are accepted and ignored; ones that would (`suffix`, `best_of` != n,
`tools`) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from llmx.runtime.sequence import MAX_LOGPROBS, SamplingParams
from llmx.serve.errors import ApiError, bad_request

MAX_CHOICES = 16  # most completions (n) per request
NonNegInt = Annotated[StrictInt, Field(ge=0)]
Number = Annotated[float, Field(allow_inf_nan=False, strict=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: NonNegInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: "StreamOptions | None" = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: NonNegInt = 0
    return_tokens_as_token_ids: StrictBool = False  # logprobs name tokens "token_id:ID" instead of their text


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[NonNegInt], list[list[NonNegInt]]]
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: StrictInt | None = None
    suffix: str | None = None
    # Each choice (and stream chunk) also carries the generated ids as `token_ids`, and a chunk is sent for every
    # step that generated tokens even when their text is empty (an engine without a tokenizer, a partial UTF-8
    # character): what a benchmark client needs to time each token.
    return_token_ids: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Request):
    messages: list[Message]
    max_completion_tokens: NonNegInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None


def parse(model: type[BaseModel], body: Any) -> Any:
    """body (decoded JSON) as `model`, or a 400 naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"] if not _is_type_tag(part)) or None
        given = error.get("input")
        shown = f" (got {given!r})" if not isinstance(given, (dict, list)) and given is not None else ""
        raise bad_request(f"Invalid value for '{param}': {error['msg']}{shown}.", param=param,
                          code="invalid_value") from None


def _is_type_tag(part: Any) -> bool:
    """Pydantic's locations name the union member tried (`str`, `list[int]`, ...); the field name is enough."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def sampling_params(req: CompletionRequest | ChatCompletionRequest, *, max_new_tokens: int,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise bad_request("Invalid value for 'stop': stop strings must not be empty.", param="stop")
    if req.min_tokens > max_new_tokens:
        raise bad_request(f"Invalid value for 'min_tokens': {req.min_tokens} is more than the "
                          f"{max_new_tokens} tokens the request may generate.", param="min_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    try:
        return _sampling_params(req, max_new_tokens, temperature, stop, logprobs, prompt_logprobs)
    except ValueError as exc:  # a combination the runtime refuses (each field alone was validated above)
        raise bad_request(f"{exc}.") from None


def _sampling_params(req, max_new_tokens: int, temperature: float, stop: list[str], logprobs: int | None,
                     prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=max(req.top_k or 0, 0),
        top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(stop),
        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise bad_request("'suffix' is not supported: the model only continues the prompt.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("'best_of' other than n is not supported.", param="best_of")
    elif req.tools:
        raise bad_request("'tools' is not supported by this server.", param="tools")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: {"role", "content"} with text content."""
    if not req.messages:
        raise bad_request("'messages' must hold at least one message.", param="messages")
    turns = []
    for message in req.messages:
        content = message.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        turns.append({"role": role, "content": content or ""})
    return turns


def completion_prompts(prompt: str | list) -> list[str | list[int]]:
    """OpenAI's four prompt shapes as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("'prompt' must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if any(isinstance(p, list) and not p for p in prompt):
        raise bad_request("'prompt' holds an empty list of token ids.", param="prompt")
    return list(prompt)


def token_budget(num_prompt_tokens: int, requested: int | None, default: int | None, max_seq_len: int,
                 param: str) -> int:
    """Tokens a request may generate: what it asked for, else `default` (None: up to the context length),
    never past the engine's max_seq_len; a prompt or request that cannot fit is a 400."""
    room = max_seq_len - num_prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens, but the prompt has "
                       f"{num_prompt_tokens} tokens; shorten the prompt.", param="prompt",
                       code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens: the prompt has "
                       f"{num_prompt_tokens} tokens and {param} asks for {requested} more; lower {param}.",
                       param=param, code="context_length_exceeded")
    return requested


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()

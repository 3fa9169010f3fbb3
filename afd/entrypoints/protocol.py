"""The OpenAI API as the server sees it: the engine interface it drives (`EngineClient`), request
validation into SamplingParams, and OpenAI-shaped errors. No HTTP here (see
afd.entrypoints.server)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from afd.outputs import RequestOutput
from afd.sampling.params import INT64_MAX, INT64_MIN, SamplingParams

if TYPE_CHECKING:
    from afd.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP server needs from an engine (AsyncEngine in afd.engine.async_engine
    implements it)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative snapshots, the last with finished=True; ValueError for a bad request,
        RuntimeError (EngineDeadError) when the engine fails."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop the request and free its KV blocks; unknown ids are ignored."""
        ...

    def health(self) -> tuple[bool, str]:
        """(can serve, reason): "ok", or what is being recovered while a worker is replaced
        (still True), or why the engine cannot serve (False -> 503)."""
        ...

    def stats(self) -> dict[str, float]:
        """num_requests_running, num_requests_waiting, kv_cache_usage_perc and cumulative
        per-stage seconds named afd_stage_<stage>_seconds."""
        ...


class APIError(Exception):
    """An error the client gets as OpenAI's {"error": {message, type, param, code}} body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class GenerateRequest:
    """A validated completions or chat request, ready for engine.generate."""

    chat: bool
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    # how many alternatives per position the response lists (None: no logprobs asked)
    top_logprobs: int | None = None


# -- field readers: JSON types are checked strictly (true is not 1, "3" is not 3) ---------------


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(body: dict, name: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise bad_request(f"'{name}' must be an integer, got {_show(value)}", name)
    if not INT64_MIN <= value <= INT64_MAX:  # nothing here needs more; msgpack holds 64 bits
        raise bad_request(f"'{name}' is out of range (signed 64-bit), got {_show(value)}", name)
    return value


def _number(body: dict, name: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float):
        raise bad_request(f"'{name}' must be a number, got {_show(value)}", name)
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        value = math.inf
    if not math.isfinite(value):  # Python's JSON reads NaN and Infinity
        raise bad_request(f"'{name}' must be a finite number, got {_show(body.get(name))}", name)
    return value


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise bad_request(f"'{name}' must be true or false, got {_show(value)}", name)
    return value


def _unicode(text: str, name: str) -> str:
    """JSON can carry lone surrogates (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"'{name}' is not valid Unicode (a lone surrogate)", name) from None
    return text


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if not all(stop):
        raise bad_request("'stop' strings must not be empty", "stop")
    return [_unicode(s, "stop") for s in stop]


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise bad_request(f"'{name}' must be a list of integers", name)
    if any(t < 0 for t in value):
        raise bad_request(f"'{name}' must not hold negative token ids", name)
    if any(t > INT64_MAX for t in value):
        raise bad_request(f"'{name}' holds a token id beyond 64 bits", name)
    return value


def _check_unsupported(body: dict) -> None:
    # silently ignoring these would change what the client asked for
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise bad_request(f"'{name}' is not supported", name)
    if body.get("tools"):
        raise bad_request("'tools' (function calling) is not supported", "tools")
    if _int(body, "best_of", 1) != 1:
        raise bad_request("'best_of' other than 1 is not supported", "best_of")
    if _bool(body, "echo"):
        raise bad_request("'echo' is not supported", "echo")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported", "suffix")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if not stream:
        raise bad_request("'stream_options' needs 'stream' set to true", "stream_options")
    value = options.get("include_usage")
    if value is not None and type(value) is not bool:
        raise bad_request("'stream_options.include_usage' must be true or false", "stream_options")
    return bool(value)


def _sampling_params(body: dict, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        stop_token_ids = _token_ids(stop_token_ids, "stop_token_ids")
    values = dict(
        n=_int(body, "n", 1),
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=_int(body, "top_k", 0),
        min_p=_number(body, "min_p", 0.0),
        seed=_int(body, "seed"),
        stop=_stop(body),
        stop_token_ids=stop_token_ids,
        max_tokens=max_tokens,
        ignore_eos=_bool(body, "ignore_eos"),
        logprobs=logprobs,
    )
    if values["n"] < 1:
        raise bad_request(f"'n' must be at least 1, got {values['n']}", "n")
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        # SamplingParams messages start with the field name: use it as the param
        raise bad_request(str(e), str(e).split(" ", 1)[0]) from e


def _check_context(n_prompt: int, max_tokens: int, max_model_len: int, prompt_param: str) -> None:
    if n_prompt >= max_model_len:
        raise bad_request(
            f"the prompt has {n_prompt} tokens, but this model's maximum context length is "
            f"{max_model_len} tokens (at most {max_model_len - 1} prompt tokens)",
            prompt_param,
            "context_length_exceeded",
        )
    if n_prompt + max_tokens > max_model_len:
        raise bad_request(
            f"this model's maximum context length is {max_model_len} tokens, but the request "
            f"has {n_prompt} prompt tokens and asks for {max_tokens} completion tokens",
            "max_tokens",
            "context_length_exceeded",
        )


def _max_tokens(value: int | None, name: str) -> int | None:
    if value is not None and value < 1:
        raise bad_request(f"'{name}' must be at least 1, got {value}", name)
    return value


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_show(model)}", "model")
    if model != model_name:
        raise APIError(
            404, f"the model '{model}' does not exist", "invalid_request_error", "model",
            "model_not_found",
        )  # fmt: skip


def parse_completion_request(body: dict, engine: EngineClient) -> GenerateRequest:
    """Validate a /v1/completions body: one prompt (text, token ids, or a one-element list of
    either); max_tokens defaults to 16 as in OpenAI."""
    check_model(body, engine.model_name)
    _check_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) != 1:
            raise bad_request(
                "batched prompts are not supported: send one prompt per request", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        ids = engine.tokenizer.encode(_unicode(prompt, "prompt"))
    elif isinstance(prompt, list):
        ids = _token_ids(prompt, "prompt")
    else:
        raise bad_request(
            "'prompt' must be a string, a list of token ids, or a list with one of those", "prompt"
        )
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    max_tokens = _max_tokens(_int(body, "max_tokens"), "max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens
    _check_context(len(ids), max_tokens, engine.max_model_len, "prompt")
    logprobs = _int(body, "logprobs")
    stream = _bool(body, "stream")
    return GenerateRequest(
        chat=False,
        prompt_token_ids=ids,
        params=_sampling_params(body, max_tokens, logprobs),
        stream=stream,
        include_usage=_stream_options(body, stream),
        top_logprobs=logprobs,
    )


def _message_text(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"messages[{i}] must be an object with a string 'role'", "messages")
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: only text ones can be served
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise bad_request(f"messages[{i}]: only text content parts are supported", "messages")
        if not all(isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"messages[{i}]: a text part needs a string 'text'", "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or text parts", "messages")
    _unicode(message["role"], "messages")
    return {"role": message["role"], "content": _unicode(content, "messages")}


def parse_chat_request(body: dict, engine: EngineClient) -> GenerateRequest:
    """Validate a /v1/chat/completions body; the prompt is the chat template with the generation
    prompt, tokenised without adding special tokens (the template has them)."""
    check_model(body, engine.model_name)
    _check_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    messages = [_message_text(m, i) for i, m in enumerate(messages)]
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # template errors are about the client's messages
        raise bad_request(f"could not apply the chat template: {e}", "messages") from e
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered chat prompt is empty", "messages")
    max_tokens = _max_tokens(_int(body, "max_completion_tokens"), "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(_int(body, "max_tokens"), "max_tokens")
    remaining = engine.max_model_len - len(ids)
    _check_context(len(ids), max_tokens or 1, engine.max_model_len, "messages")
    max_tokens = remaining if max_tokens is None else max_tokens
    want_logprobs = _bool(body, "logprobs")
    top_logprobs = _int(body, "top_logprobs")
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise bad_request(
            f"'top_logprobs' must be between 0 and 20, got {top_logprobs}", "top_logprobs"
        )
    logprobs = (top_logprobs or 0) if want_logprobs else None
    stream = _bool(body, "stream")
    return GenerateRequest(
        chat=True,
        prompt_token_ids=ids,
        params=_sampling_params(body, max_tokens, logprobs),
        stream=stream,
        include_usage=_stream_options(body, stream),
        top_logprobs=logprobs,
    )

"""The OpenAI API as the server sees it: the engine interface it drives (`EngineClient`), the
request and response schemas (pydantic), request validation into SamplingParams, and
OpenAI-shaped errors. No HTTP here (see afd.entrypoints.server)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from afd.outputs import RequestOutput
from afd.sampling.params import INT64_MAX, INT64_MIN, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from afd.config import EngineConfig
    from afd.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP server needs from an engine (AsyncEngine in afd.engine.async_engine
    implements it); the server reads nothing else of it."""

    model_name: str
    model_root: str  # the model as given: the model cards' `root`
    max_model_len: int
    tokenizer: Tokenizer
    config: EngineConfig | None  # the engine's settings (system_fingerprint); None: unknown
    # sequences (n per request) running + queued at most; a request above it is a 400
    sequence_capacity: int | None

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative snapshots, the last with finished=True; ValueError for a bad request,
        EngineOverloadedError when admission is full (503), RuntimeError (EngineDeadError)
        when the engine fails."""
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

    def failure_stats(self) -> dict[str, Any]:
        """worker_restarts (per role), requests_recomputed, recovery_seconds (a list),
        nodes_lost (per node rank)."""
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
    """A validated completions or chat request, ready for engine.generate: one engine request
    per prompt (a batched completions request has several)."""

    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    # how many alternatives per position the response lists (None: no logprobs asked)
    top_logprobs: int | None = None
    echo: bool = False  # completions: the prompt's text (and logprobs) lead each choice
    # completions with max_tokens 0 and echo: score the prompt only (vLLM's); the engine still
    # computes one token, which no choice shows
    echo_only: bool = False
    prompt_texts: list[str] = field(default_factory=list)  # for echo
    prompt_logprobs: int | None = None  # asked for: each choice lists them (vLLM's field)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.prompts[0]


# -- request schemas: JSON types are checked strictly (true is not 1, "3" is not 3) -------------


def _integral(value: Any) -> Any:
    # 3.0 is an integer to JSON; 3.5 and true are not
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# nothing a request says needs more than 64 bits, and msgpack carries no more to the workers
Int = Annotated[int, BeforeValidator(_integral), Field(ge=INT64_MIN, le=INT64_MAX)]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class StreamOptions(_Schema):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; usage arrives at the end here


class JSONSchemaFormat(_Schema):
    """response_format.json_schema: OpenAI's {name, description, schema, strict}."""

    model_config = ConfigDict(
        strict=True, allow_inf_nan=False, extra="forbid", populate_by_name=True
    )
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Any = None


class _SamplingRequest(_Schema):
    """Fields both endpoints share: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: Int | None = None
    response_format: ResponseFormat | None = None
    # accepted and ignored, as they do not change the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    store: bool | None = None
    # vLLM's sampling extras
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # vLLM's structured outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # known, not supported: refused with a clear 400 (see _refuse_unsupported)
    best_of: Int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[Int] | list[list[Int]] | None = None
    logprobs: Int | None = None
    echo: bool | None = None
    suffix: str | None = None
    prompt_logprobs: Int | None = None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions; messages are checked one by one (only text is served)."""

    messages: Any = None
    max_completion_tokens: Int | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "finite": "a finite number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "an object",
    "model": "an object",
    "literal": "one of the allowed values",
}


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# fields whose JSON type may be one of several
_UNION_WORDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "guided_json": "a JSON schema (an object or a string)",
}
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _validation_error(e: ValidationError, body: dict) -> APIError:
    """The first problem pydantic found, in OpenAI's words."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    name = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {name}", name)
    if err["type"] == "missing":
        return bad_request(f"'{'.'.join(loc)}' is required", name)
    got = _show(body.get(name) if name in body else err.get("input"))
    if name in _UNION_WORDS:
        return bad_request(f"'{name}' must be {_UNION_WORDS[name]}, got {got}", name)
    # union members' tags ("str", "list[int]") make the location noisy
    where = ".".join(x for x in loc if "[" not in x and x not in _TYPE_TAGS)
    kind = "finite" if err["type"] == "finite_number" else err["type"].split("_")[0]
    if kind == "literal" and "expected" in err.get("ctx", {}):
        return bad_request(f"'{where}' must be {err['ctx']['expected']}, got {got}", name)
    if kind in _TYPE_WORDS:
        if len(where.split(".")) > 1:
            got = _show(err.get("input"))
        return bad_request(f"'{where}' must be {_TYPE_WORDS[kind]}, got {got}", name)
    return bad_request(f"'{where}': {err['msg']}", name)


def _lone_surrogate(value: Any) -> bool:
    """JSON can escape lone surrogates (\\ud800), which are no text a tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_lone_surrogate(k) or _lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_lone_surrogate(v) for v in value)
    return False


def check_text(body: Any) -> None:
    """400 for a field name or value that is no UTF-8 text; the message names the field only,
    never the raw input (which could not be encoded into the error body)."""
    if isinstance(body, dict):
        for name, value in body.items():
            if _lone_surrogate(name):
                raise bad_request("a field name is not valid UTF-8 text (a lone surrogate)")
            if _lone_surrogate(value):
                raise bad_request(f"'{name}' is not valid UTF-8 text (a lone surrogate)", name)


def _validate(model: type[BaseModel], body: dict) -> Any:
    check_text(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e, body) from None


# -- the body: JSON that cannot exhaust the parser ----------------------------------------------

MAX_JSON_DEPTH = 64  # objects and arrays inside each other (a JSON schema needs far fewer)
_MAX_INT_CHARS = 100  # far beyond 64 bits (those get a 400 naming their field), far below 4,300


def _parse_int(text: str) -> int | float:
    # before int() sees it (a 4,300-digit integer costs quadratic time, then raises): a huge
    # one becomes an infinity, which the schema refuses with the field's name
    if len(text) > _MAX_INT_CHARS:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object; 400 for what is not UTF-8 JSON, nests deeper than
    MAX_JSON_DEPTH, or holds integers far beyond 64 bits (never a 500 or a stall)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8: {e}") from None
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if _too_deep(body, MAX_JSON_DEPTH):
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def encode_prompt(
    tokenizer: Tokenizer, text: str, max_model_len: int, param: str, special: bool = True
) -> list[int]:
    """Token ids of a prompt text; a text that cannot fit the context is refused (400) as soon
    as that is certain, without encoding all of it."""
    from afd.tokenizer import TooManyTokensError

    try:
        return tokenizer.encode_capped(text, max_model_len - 1, add_special_tokens=special)
    except TooManyTokensError as e:
        raise _too_long(e.at_least, max_model_len, param) from None


def _too_long(at_least: int, max_model_len: int, param: str) -> APIError:
    return bad_request(
        f"the prompt has at least {at_least} tokens, but this model's maximum context "
        f"length is {max_model_len} tokens (at most {max_model_len - 1} prompt tokens)",
        param,
        "context_length_exceeded",
    )


# -- request -> SamplingParams ----------------------------------------------------------------


def _refuse_unsupported(r: _SamplingRequest) -> None:
    # silently ignoring these would change what the client asked for
    if r.tools:
        raise bad_request("'tools' (function calling) is not supported", "tools")
    if r.tool_choice not in (None, "none"):
        raise bad_request("'tool_choice' other than \"none\" is not supported", "tool_choice")
    if r.functions:
        raise bad_request("'functions' (function calling) is not supported", "functions")
    if r.function_call not in (None, "none"):
        raise bad_request("'function_call' is not supported", "function_call")
    if r.best_of not in (None, 1):
        raise bad_request("'best_of' other than 1 is not supported", "best_of")


def _stream_options(r: _SamplingRequest) -> bool:
    if r.stream_options is None:
        return False
    if not r.stream:
        raise bad_request("'stream_options' needs 'stream' set to true", "stream_options")
    return bool(r.stream_options.include_usage)


def _structured_outputs(r: _SamplingRequest) -> tuple[StructuredOutputsParams | None, str]:
    """At most one of response_format (json_object, json_schema), guided_json, guided_regex,
    guided_choice, guided_grammar and structured_outputs; also the name of the field used."""
    given: list[tuple[str, dict[str, Any]]] = []
    if r.response_format is not None and r.response_format.type != "text":
        fmt = r.response_format
        if fmt.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        else:
            if fmt.json_schema is None:
                raise bad_request(
                    "'response_format' of type json_schema needs a 'json_schema' object",
                    "response_format",
                )
            try:
                spec = JSONSchemaFormat.model_validate(fmt.json_schema)
            except ValidationError as e:
                err = _validation_error(e, {})
                raise bad_request(
                    f"'response_format.json_schema': {err.message}", "response_format"
                ) from None
            if spec.json_schema is None:
                given.append(("response_format", {"json_object": True}))
            else:
                given.append(("response_format", {"json": spec.json_schema}))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(r, name)
        if value is not None:
            given.append((name, {key: value}))
    if r.structured_outputs is not None:
        given.append(("structured_outputs", dict(r.structured_outputs)))
    if not given:
        return None, "structured_outputs"
    if len(given) > 1:
        names = ", ".join(n for n, _ in given)
        raise bad_request(
            f"give at most one structured output constraint, got {names}", given[1][0]
        )
    name, spec = given[0]
    try:
        return StructuredOutputsParams(**spec), name
    except (TypeError, ValueError) as e:
        raise bad_request(f"'{name}': {e}", name) from None


def _sampling_params(
    r: _SamplingRequest, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None
) -> SamplingParams:
    structured, structured_field = _structured_outputs(r)
    values = dict(
        n=1 if r.n is None else r.n,
        temperature=1.0 if r.temperature is None else r.temperature,
        top_p=1.0 if r.top_p is None else r.top_p,
        top_k=r.top_k or 0,
        min_p=r.min_p or 0.0,
        seed=r.seed,
        stop=r.stop,
        stop_token_ids=r.stop_token_ids,
        max_tokens=max_tokens,
        ignore_eos=bool(r.ignore_eos),
        logprobs=logprobs,
        presence_penalty=r.presence_penalty or 0.0,
        frequency_penalty=r.frequency_penalty or 0.0,
        repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
        logit_bias=r.logit_bias,
        min_tokens=r.min_tokens or 0,
        skip_special_tokens=True if r.skip_special_tokens is None else r.skip_special_tokens,
        include_stop_str_in_output=bool(r.include_stop_str_in_output),
        prompt_logprobs=prompt_logprobs,
        structured_outputs=structured,
    )
    if values["n"] < 1:
        raise bad_request(f"'n' must be at least 1, got {values['n']}", "n")
    if values["stop_token_ids"] and any(t < 0 for t in values["stop_token_ids"]):
        raise bad_request("'stop_token_ids' must not hold negative token ids", "stop_token_ids")
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        # SamplingParams messages start with the field name: use it as the param
        param = str(e).split(" ", 1)[0]
        if param == "structured_outputs":
            param = structured_field
        raise bad_request(
            str(e), param if param in values or param == structured_field else None
        ) from e


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


def check_model(body: dict, model_names: list[str]) -> None:
    """404 unless the body names no model or one of the served names (400 first for text that
    is no UTF-8: every POST route checks the model before the rest)."""
    check_text(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_show(model)}", "model")
    if model is not None and model not in model_names:
        raise APIError(
            404, f"the model '{model}' does not exist", "invalid_request_error", "model",
            "model_not_found",
        )  # fmt: skip


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _prompts(prompt: Any, engine: EngineClient) -> tuple[list[list[int]], list[str]]:
    """One or several prompts (text or token ids) -> their token ids and texts."""
    if prompt is None or (isinstance(prompt, list) and not prompt):
        raise bad_request("the prompt is empty", "prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and isinstance(prompt[0], int)):
        prompt = [prompt]
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request("the prompt is empty", "prompt")
            ids.append(encode_prompt(engine.tokenizer, p, engine.max_model_len, "prompt"))
            texts.append(p)
        else:
            if not p:
                raise bad_request("the prompt is empty", "prompt")
            if any(t < 0 for t in p):
                raise bad_request("'prompt' must not hold negative token ids", "prompt")
            ids.append(p)
            texts.append(None)
        if not ids[-1]:
            raise bad_request("the prompt is empty", "prompt")
    return ids, texts


def parse_completion_request(
    body: Any, engine: EngineClient, model_names: list[str] | None = None
) -> GenerateRequest:
    """Validate a /v1/completions body: one prompt or a batch (a list of strings or of
    token-id lists: one choice per prompt and n); max_tokens defaults to 16 as in OpenAI."""
    body = _object(body)
    check_model(body, model_names or [engine.model_name])
    r: CompletionRequest = _validate(CompletionRequest, body)
    _refuse_unsupported(r)
    if r.suffix:
        raise bad_request("'suffix' is not supported", "suffix")
    ids, texts = _prompts(r.prompt, engine)
    echo = bool(r.echo)
    echo_only = echo and r.max_tokens == 0
    if echo and r.max_tokens is not None and r.max_tokens < 0:
        raise bad_request(
            f"'max_tokens' must be at least 0 with 'echo' (1 without), got {r.max_tokens}",
            "max_tokens",
        )
    max_tokens = 1 if echo_only else _max_tokens(r.max_tokens, "max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens
    for p in ids:
        _check_context(len(p), max_tokens, engine.max_model_len, "prompt")
    stream = bool(r.stream)
    prompt_logprobs = r.prompt_logprobs
    if prompt_logprobs is not None and stream:
        raise bad_request("'prompt_logprobs' is not available with 'stream'", "prompt_logprobs")
    if echo and r.logprobs is not None:
        # echoed prompt tokens come with their logprobs, as in OpenAI's API
        prompt_logprobs = max(prompt_logprobs or 0, r.logprobs)
    return GenerateRequest(
        chat=False,
        prompts=ids,
        params=_sampling_params(r, max_tokens, r.logprobs, prompt_logprobs),
        stream=stream,
        include_usage=_stream_options(r),
        top_logprobs=r.logprobs,
        echo=echo,
        echo_only=echo_only,
        prompt_logprobs=r.prompt_logprobs,
        prompt_texts=[
            engine.tokenizer.decode(p) if t is None else t
            for t, p in zip(texts, ids, strict=True)
            if echo
        ],
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
    return {"role": message["role"], "content": content}


def render_chat(
    engine: EngineClient, messages: list[dict], add_generation_prompt: bool, special: bool = False
) -> list[int]:
    """Token ids of `messages` through the chat template; contents that cannot fit the context
    are refused before the template runs."""
    tokenizer, limit = engine.tokenizer, engine.max_model_len
    chars = sum(len(m["content"]) for m in messages)
    if chars > (limit - 1) * tokenizer.max_token_chars:
        raise _too_long(chars // tokenizer.max_token_chars, limit, "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # template errors are about the client's messages
        raise bad_request(f"could not apply the chat template: {e}", "messages") from e
    return encode_prompt(tokenizer, text, limit, "messages", special)


def parse_chat_request(
    body: Any, engine: EngineClient, model_names: list[str] | None = None
) -> GenerateRequest:
    """Validate a /v1/chat/completions body; the prompt is the chat template with the generation
    prompt, tokenised without adding special tokens (the template has them)."""
    body = _object(body)
    check_model(body, model_names or [engine.model_name])
    r: ChatCompletionRequest = _validate(ChatCompletionRequest, body)
    _refuse_unsupported(r)
    for name in ("audio", "prediction", "reasoning_effort", "web_search_options"):
        if getattr(r, name) is not None:
            raise bad_request(f"'{name}' is not supported", name)
    if r.modalities not in (None, ["text"]):
        raise bad_request("only the 'text' modality is supported", "modalities")
    messages = r.messages
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    messages = [_message_text(m, i) for i, m in enumerate(messages)]
    ids = render_chat(engine, messages, True)
    if not ids:
        raise bad_request("the rendered chat prompt is empty", "messages")
    max_tokens = _max_tokens(r.max_completion_tokens, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(r.max_tokens, "max_tokens")
    remaining = engine.max_model_len - len(ids)
    _check_context(len(ids), max_tokens or 1, engine.max_model_len, "messages")
    max_tokens = remaining if max_tokens is None else max_tokens
    want_logprobs = bool(r.logprobs)
    top_logprobs = r.top_logprobs
    if top_logprobs is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise bad_request(
            f"'top_logprobs' must be between 0 and 20, got {top_logprobs}", "top_logprobs"
        )
    logprobs = (top_logprobs or 0) if want_logprobs else None
    stream = bool(r.stream)
    return GenerateRequest(
        chat=True,
        prompts=[ids],
        params=_sampling_params(r, max_tokens, logprobs, None),
        stream=stream,
        include_usage=_stream_options(r),
        top_logprobs=logprobs,
    )


# -- /tokenize and /detokenize (vLLM's) ------------------------------------------------------


class TokenizeRequest(_Schema):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: Any = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Schema):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[Int]


def parse_tokenize_request(body: Any, engine: EngineClient, model_names: list[str]) -> dict:
    """The /tokenize answer: {count, max_model_len, tokens, token_strs}."""
    body = _object(body)
    check_model(body, model_names)
    r: TokenizeRequest = _validate(TokenizeRequest, body)
    if (r.prompt is None) == (r.messages is None):
        raise bad_request("give either 'prompt' or 'messages'", "prompt")
    if r.prompt is not None:
        special = True if r.add_special_tokens is None else r.add_special_tokens
        ids = encode_prompt(engine.tokenizer, r.prompt, engine.max_model_len, "prompt", special)
    else:
        if not isinstance(r.messages, list) or not r.messages:
            raise bad_request("'messages' must be a non-empty list", "messages")
        messages = [_message_text(m, i) for i, m in enumerate(r.messages)]
        special = bool(r.add_special_tokens)  # the template has its special tokens
        ids = render_chat(engine, messages, r.add_generation_prompt, special)
    strs = [engine.tokenizer.id_to_token(t) for t in ids] if r.return_token_strs else None
    return TokenizeResponse(
        count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
    ).model_dump()


def parse_detokenize_request(body: Any, engine: EngineClient, model_names: list[str]) -> dict:
    """The /detokenize answer: {prompt}; token ids must be in the vocabulary."""
    body = _object(body)
    check_model(body, model_names)
    r: DetokenizeRequest = _validate(DetokenizeRequest, body)
    vocab = engine.tokenizer.vocab_size
    if len(r.tokens) > engine.max_model_len:
        raise bad_request(
            f"'tokens' has {len(r.tokens)} ids; at most {engine.max_model_len} (max_model_len)",
            "tokens",
        )
    bad = [t for t in r.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is out of range for vocabulary size {vocab}", "tokens"
        )
    return DetokenizeResponse(prompt=engine.tokenizer.decode(r.tokens, False)).model_dump()


# -- GET /tokenizer_info (vLLM's, behind --enable-tokenizer-info-endpoint) ----------------------

_ADDED_TOKEN_KEYS = {
    "__type",
    "content",
    "lstrip",
    "rstrip",
    "normalized",
    "single_word",
    "special",
}


def _token_strings(value: Any) -> Any:
    # tokenizer_config.json writes special tokens as AddedToken objects: their text stands in
    if isinstance(value, dict):
        if isinstance(value.get("content"), str) and set(value) <= _ADDED_TOKEN_KEYS:
            return value["content"]
        return {k: _token_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_token_strings(v) for v in value]
    return value


def _is_json(value: Any) -> bool:
    # init_kwargs may hold Python objects (paths, AddedToken maps): only JSON values are served
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What vLLM's /tokenizer_info returns: the tokenizer's configuration (tokenizer_config.json
    without file paths, special tokens as their text), its class name and the chat template the
    server applies; eos_token is always there (lm-eval's remote tokenizer requires it)."""
    hf = tokenizer.hf
    skip = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
    info = _token_strings({k: v for k, v in hf.init_kwargs.items() if k not in skip})
    info = {k: v for k, v in info.items() if _is_json(v)}
    for key, text in hf.special_tokens_map.items():
        info.setdefault(key, text)
    if info.get("eos_token") is None and tokenizer.eos_token_ids:
        info["eos_token"] = tokenizer.id_to_token(min(tokenizer.eos_token_ids))
    info.setdefault("eos_token", None)
    info["tokenizer_class"] = info.get("tokenizer_class") or "PreTrainedTokenizerFast"
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    else:
        info.pop("chat_template", None)
    return info


# -- response schemas -------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _omitted_when_none(default: Any = None) -> Any:
    # fields that OpenAI leaves out rather than sending null
    return Field(default, exclude_if=lambda v: v is None)


class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(_Response):
    """vLLM's prompt_logprobs entry for one candidate token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionLogprobs(_Response):
    """OpenAI's legacy completions logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    # vLLM's: the stop string or stop token id that ended the choice (None for EOS and length)
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = _omitted_when_none()


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    # vLLM's: a whole response carries it (server.system_fingerprint), a stream's chunks do not
    system_fingerprint: str | None = _omitted_when_none()
    usage: UsageInfo | None = _omitted_when_none()


class ChatTopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatLogprobToken]


class ChatMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = _omitted_when_none()
    content: str | None = _omitted_when_none()


class ChatStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = _omitted_when_none()


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(_Response):
    prompt: str

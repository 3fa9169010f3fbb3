"""OpenAI-compatible HTTP API over an EngineClient: /v1/completions, /v1/chat/completions,
/v1/models, /tokenize, /detokenize, /tokenizer_info (when enabled), /version, /health, /metrics,
behind the HTTP guard of
afd.entrypoints.serving. Errors have OpenAI's shape (never FastAPI's 422), and a request whose
client went away is aborted in the engine so its KV blocks are freed."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import afd
from afd.config import EngineConfig
from afd.entrypoints.metrics import ServerMetrics
from afd.entrypoints.protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatStreamChoice,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    EngineClient,
    GenerateRequest,
    PromptLogprob,
    UsageInfo,
    error_body,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_json_body,
    parse_tokenize_request,
    tokenizer_info,
)
from afd.entrypoints.serving import (
    HTTPGuard,
    RequestInfo,
    ServerConfig,
    ServerState,
    make_server,
    request_info,
)
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling.structured import GRAMMAR_DEAD_END

logger = logging.getLogger("afd.entrypoints.server")

# nginx's "client closed request": nobody reads it, but access logs should not say 200
STATUS_CLIENT_CLOSED = 499


class ClientDisconnected(Exception):
    """The HTTP client hung up before the request finished."""


class Generation:
    """One engine request seen from the server: pulls snapshots while watching the client,
    records latency metrics, and always leaves the engine clean (abort unless finished)."""

    def __init__(
        self,
        engine: EngineClient,
        request: Request,
        req: GenerateRequest,
        metrics: ServerMetrics,
        poll_s: float,
        request_id: str,
        prompt_index: int = 0,
        state: ServerState | None = None,
    ):
        self.engine = engine
        self.state = state or ServerState()
        self.request = request
        self.req = req
        self.metrics = metrics
        self.poll_s = poll_s
        self.request_id = request_id
        self.prompt_index = prompt_index
        self.prompt_ids = req.prompts[prompt_index]
        self.start = time.monotonic()
        self._last_token_at = self._checked = self.start
        self._num_tokens = 0
        self._stream = engine.generate(self.request_id, self.prompt_ids, req.params)
        self._pending: asyncio.Future | None = None
        self.finished = False
        self.closed = False

    async def next(self) -> RequestOutput | None:
        """The next snapshot, or None once the engine stream ended. Raises ClientDisconnected,
        APIError(400) for ValueError from the engine, APIError(500) for any other failure."""
        task = asyncio.ensure_future(self._stream.__anext__())
        self._pending = task
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.poll_s)
                if self.state.abort_in_flight:
                    raise APIError(
                        503, "the server shut down before this request finished",
                        "service_unavailable",
                    )  # fmt: skip
                # every poll_s, also while tokens arrive faster than that
                now = time.monotonic()
                if not done or now - self._checked >= self.poll_s:
                    self._checked = now
                    if await self.request.is_disconnected():
                        raise ClientDisconnected
                if done:
                    break
        except BaseException:
            task.cancel()  # throws into the engine stream, whose cleanup aborts the request
            task.add_done_callback(_consume_result)
            raise
        self._pending = None
        try:
            out = task.result()
        except StopAsyncIteration:
            return None
        except ValueError as e:
            raise APIError(400, str(e), "invalid_request_error") from e
        except Exception as e:
            if str(e).startswith(GRAMMAR_DEAD_END):  # the request's constraint, not the engine
                raise APIError(400, str(e), "invalid_request_error", None,
                               "structured_output_dead_end") from e  # fmt: skip
            status = getattr(e, "http_status", None)
            if status is not None:  # e.g. the engine's admission queue is full: 503
                raise APIError(status, str(e), "service_unavailable") from e
            logger.warning("request %s failed in the engine: %r", self.request_id, e)
            raise APIError(500, f"the engine failed on this request: {e}", "server_error") from e
        self._record(out)
        return out

    async def final(self, out: RequestOutput) -> RequestOutput:
        """Pull snapshots until the finished one."""
        while not out.finished:
            nxt = await self.next()
            if nxt is None:
                raise APIError(500, "the engine stream ended unfinished", "server_error")
            out = nxt
        return out

    def _record(self, out: RequestOutput) -> None:
        now = time.monotonic()
        # n > 1 sequences advance in lockstep: a step adds one token to each
        num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        new = num_tokens - self._num_tokens
        if new > 0:
            if self._num_tokens == 0:
                self.metrics.observe_first_token(now - self.start, len(self.prompt_ids), new)
                if new > 1:
                    self.metrics.observe_tokens(0.0, new - 1)
            else:
                self.metrics.observe_tokens(now - self._last_token_at, new)
            self._num_tokens, self._last_token_at = num_tokens, now
        if out.finished and not self.finished:
            self.finished = True
            self.metrics.observe_finished(now - self.start, out)

    async def close(self) -> None:
        """Abort in the engine unless the request finished; safe to call twice and under
        cancellation."""
        if self.closed:
            return
        self.closed = True
        with anyio.CancelScope(shield=True):
            if not self.finished:
                self.metrics.request_aborted.inc()
                try:
                    await self.engine.abort(self.request_id)
                except Exception as e:
                    logger.warning("abort of %s failed: %r", self.request_id, e)
            # a cancelled __anext__ still in flight closes the stream itself; aclose() now
            # would fail with "already running"
            if self._pending is None or self._pending.done():
                try:
                    await self._stream.aclose()
                except Exception as e:  # a failing engine stream has already said so
                    logger.debug("closing the stream of %s: %r", self.request_id, e)


def _consume_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class _ClosingStreamingResponse(StreamingResponse):
    # Starlette leaves the body generator suspended when the send fails (client gone); closing
    # it here runs its `finally` now instead of at garbage collection, so the abort is prompt.
    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


# -- response bodies ------------------------------------------------------------------------


class ResponseShaper:
    """Shapes one API response (all of a request's prompts and choices) from engine snapshots."""

    def __init__(
        self,
        engine: EngineClient,
        req: GenerateRequest,
        response_id: str,
        model_name: str,
        fingerprint: str | None = None,
    ):
        self.engine = engine
        self.model_name = model_name
        self.req = req
        self.id = response_id
        self.created = int(time.time())
        self.n = req.params.n
        self.fingerprint = fingerprint

    def shown(self, c: CompletionOutput) -> tuple[str, list[int], list | None]:
        """(text, token ids, logprob entries) of a choice's completion as the client sees it:
        nothing when only the echoed prompt was asked for (max_tokens 0)."""
        if self.req.echo_only:
            return "", [], [] if c.logprobs is not None else None
        return c.text, list(c.token_ids), c.logprobs

    def choice_index(self, gen: Generation, c: CompletionOutput) -> int:
        # a batched completions request lists prompt 0's n choices, then prompt 1's, ...
        return gen.prompt_index * self.n + c.index

    def usage(self, finals: list[RequestOutput]) -> UsageInfo:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(len(self.shown(c)[1]) for out in finals for c in out.outputs)
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def token_text(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def logprobs(
        self, token_ids: list[int], entries: list | None, text_offset: int
    ) -> CompletionLogprobs | ChatLogprobs | None:
        if self.req.top_logprobs is None or entries is None:
            return None
        if self.req.chat:
            return self.chat_logprobs(token_ids, entries, self.req.top_logprobs)
        return self.completion_logprobs(token_ids, entries, self.req.top_logprobs, text_offset)

    def completion_logprobs(
        self, token_ids: list[int], entries: list, k: int, text_offset: int
    ) -> CompletionLogprobs:
        """OpenAI's legacy completions logprobs; an entry may be None (the first echoed prompt
        token has no logprob)."""
        pairs = list(zip(token_ids, entries, strict=False))
        tokens = [self.token_text(t, e.get(t) if e else None) for t, e in pairs]
        offsets = []
        for text in tokens:
            offsets.append(text_offset)
            text_offset += len(text)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e[t].logprob if e and t in e else None for t, e in pairs],
            top_logprobs=[
                None if e is None else {self.token_text(i, lp): lp.logprob for i, lp in _top(e, k)}
                for e in entries
            ],
            text_offset=offsets,
        )

    def chat_logprobs(self, token_ids: list[int], entries: list, k: int) -> ChatLogprobs:
        """Chat logprobs: content[{token, logprob, bytes, top_logprobs: [{token, logprob,
        bytes}]}]."""

        def item(token_id: int, lp: Logprob | None) -> dict[str, Any]:
            text = self.token_text(token_id, lp)
            return {
                "token": text,
                "logprob": lp.logprob if lp is not None else -9999.0,
                "bytes": list(text.encode("utf-8")),
            }

        return ChatLogprobs(
            content=[
                ChatLogprobToken(
                    **item(t, e.get(t)),
                    top_logprobs=[ChatTopLogprob(**item(i, lp)) for i, lp in _top(e, k)],
                )
                for t, e in zip(token_ids, entries, strict=False)
            ]
        )

    def prompt_logprobs(self, out: RequestOutput) -> list | None:
        if out.prompt_logprobs is None:
            return None
        return [
            None
            if e is None
            else {
                str(t): PromptLogprob(
                    logprob=lp.logprob, rank=lp.rank, decoded_token=lp.decoded_token
                )
                for t, lp in e.items()
            }
            for e in out.prompt_logprobs
        ]

    def echo_prefix(
        self, gen: Generation, out: RequestOutput
    ) -> tuple[str, list[int], list | None]:
        """(text, token ids, logprob entries) that an echoed choice starts with."""
        if not self.req.echo:
            return "", [], None
        entries = None
        if self.req.top_logprobs is not None:
            entries = list(out.prompt_logprobs or [None] * len(gen.prompt_ids))
        return self.req.prompt_texts[gen.prompt_index], list(gen.prompt_ids), entries

    def full(self, gens: list[Generation], finals: list[RequestOutput]) -> dict[str, Any]:
        choices: list = []
        for gen, out in zip(gens, finals, strict=True):
            for c in sorted(out.outputs, key=lambda c: c.index):
                index = self.choice_index(gen, c)
                if self.req.chat:
                    choices.append(
                        ChatChoice(
                            index=index,
                            message=ChatMessage(content=c.text),
                            logprobs=self.logprobs(c.token_ids, c.logprobs, 0),
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    )
                    continue
                text, ids, entries = self.echo_prefix(gen, out)
                own_text, own_ids, own_entries = self.shown(c)
                if entries is not None and own_entries is not None:
                    entries = entries + list(own_entries)
                else:
                    entries = own_entries
                choice = CompletionChoice(
                    index=index,
                    text=text + own_text,
                    logprobs=self.logprobs(ids + own_ids, entries, 0),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                if self.req.prompt_logprobs is not None:
                    choice.prompt_logprobs = self.prompt_logprobs(out)
                choices.append(choice)
        kind = ChatCompletionResponse if self.req.chat else CompletionResponse
        body = kind(
            id=self.id,
            created=self.created,
            model=self.model_name,
            choices=choices,
            system_fingerprint=self.fingerprint,
            usage=self.usage(finals),
        )
        return body.model_dump()

    def chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        kind = ChatCompletionChunk if self.req.chat else CompletionResponse
        body = kind(
            id=self.id,
            created=self.created,
            model=self.model_name,
            choices=choices,
        )
        if usage is not None:
            body.usage = usage
        return f"data: {body.model_dump_json()}\n\n"


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    # the engine's dict holds the top-k plus the sampled token when it is not among them
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _StreamState:
    """What has been sent for each choice, so each chunk carries only the new part."""

    def __init__(self, response: ResponseShaper, num_choices: int):
        self.response = response
        self.text_len = [0] * num_choices
        self.num_tokens = [0] * num_choices
        self.finished = [False] * num_choices
        self.started = [False] * num_choices

    def deltas(self, gen: Generation, out: RequestOutput) -> list[str]:
        chunks = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            chunk = self._delta(gen, out, c)
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _delta(self, gen: Generation, out: RequestOutput, c: CompletionOutput) -> str | None:
        r = self.response
        i = r.choice_index(gen, c)
        own_text, own_ids, own_entries = r.shown(c)
        text = own_text[self.text_len[i] :]
        new_ids = own_ids[self.num_tokens[i] :]
        finish = c.finish_reason if not self.finished[i] else None
        entries = own_entries[self.num_tokens[i] :] if own_entries is not None else None
        echo_text, echo_ids, echo_entries = r.echo_prefix(gen, out)
        offset = len(echo_text) + self.text_len[i]  # where the new text starts in the choice
        if not self.started[i]:
            # an echoed prompt leads the choice's first chunk
            offset = 0
            text, new_ids = echo_text + text, echo_ids + list(new_ids)
            if echo_entries is not None and entries is not None:
                entries = echo_entries + list(entries)
        if not text and finish is None:
            return None  # e.g. bytes of a partial UTF-8 character or a possible stop string
        logprobs = r.logprobs(new_ids, entries, offset)
        self.started[i] = True
        self.text_len[i] = len(own_text)
        self.num_tokens[i] = len(own_ids)
        self.finished[i] = self.finished[i] or finish is not None
        stop_reason = c.stop_reason if finish is not None else None
        if r.req.chat:
            choice: Any = ChatStreamChoice(
                index=i,
                delta=DeltaMessage(content=text) if text else DeltaMessage(),
                logprobs=logprobs,
                finish_reason=finish,
                stop_reason=stop_reason,
            )
        else:
            choice = CompletionChoice(
                index=i, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason
            )
        return r.chunk([choice])


async def _gather(coros: list) -> list:
    """Await all; on the first failure cancel the rest (a Generation waiting on a request that
    was aborted would otherwise wait for ever) and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        with anyio.CancelScope(shield=True):
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        raise


# -- the app ----------------------------------------------------------------------------------


def build_app(
    engine: EngineClient,
    config: ServerConfig | None = None,
    *,
    disconnect_poll_s: float = 0.1,
    state: ServerState | None = None,
    **settings: Any,
) -> FastAPI:
    """The FastAPI app behind AFD's HTTP guard (afd.entrypoints.serving); `config` (or its
    fields as keywords, e.g. api_key="...") sets the limits, the key and the served names."""
    config = dataclasses.replace(config or ServerConfig(), **settings)
    names = list(config.served_model_names or [engine.model_name])
    state = state or ServerState()
    app = FastAPI(title="AFD", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(names[0])
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.afd = state
    app.add_middleware(HTTPGuard, config=config, state=state, on_error=metrics.count_error)
    # parsing and tokenizing run in threads, a few at a time: a huge body never holds up the
    # event loop, and many huge bodies never hold every thread
    parse_limiter = anyio.CapacityLimiter(2)
    expected_auth = None if config.api_key is None else _digest(f"Bearer {config.api_key}")
    fingerprint = system_fingerprint(engine)

    def error_response(e: APIError) -> JSONResponse:
        metrics.count_error(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        errors = e.errors()
        where = ".".join(str(x) for x in errors[0].get("loc", ())) if errors else None
        message = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return error_response(APIError(400, f"{where}: {message}" if where else message))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        logger.exception("unhandled error in a request")
        return error_response(APIError(500, f"internal server error: {e}", "server_error"))

    def check_api_key(request: Request) -> None:
        """Every Authorization header must be exactly 'Bearer KEY' (compared in constant time,
        through digests so the length leaks nothing either)."""
        if expected_auth is None:
            return
        given = [value for name, value in request.scope["headers"] if name == b"authorization"]
        ok = bool(given)
        for value in given:
            ok &= hmac.compare_digest(_digest(value), expected_auth)
        if not ok:
            raise APIError(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    def check_healthy() -> None:
        ok, reason = engine.health()
        if not ok:
            raise APIError(503, f"the engine is not healthy: {reason}", "service_unavailable")

    async def parse(request: Request, parser) -> Any:
        """Parse the body and run `parser(body, engine, names)` in a worker thread."""
        raw = await request.body()

        def run():
            return parser(parse_json_body(raw), engine, names)

        return await anyio.to_thread.run_sync(run, limiter=parse_limiter)

    @app.get("/health")
    async def health():
        ok, reason = engine.health()
        if ok and reason == "ok":
            return JSONResponse({"status": "ok"})
        if ok:  # a worker is being replaced: requests wait a little, nothing is lost
            return JSONResponse({"status": "recovering", "reason": reason})
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/version")
    async def version():
        return {"version": afd.__version__}

    @app.get("/metrics")
    async def metrics_page(request: Request):
        if config.protect_metrics:
            check_api_key(request)
        metrics.refresh(engine)
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "afd",
            "root": getattr(engine, "model_root", engine.model_name),
            "parent": None,
            "max_model_len": engine.max_model_len,
            "permission": [],
        }

    created = int(time.time())

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str):
        check_api_key(request)
        if model not in names:
            raise APIError(
                404, f"the model '{model}' does not exist", param="model", code="model_not_found"
            )
        return model_card(model)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_api_key(request)
        return await parse(request, parse_tokenize_request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_api_key(request)
        return await parse(request, parse_detokenize_request)

    @app.get("/tokenizer_info")
    async def get_tokenizer_info(request: Request):
        if not config.enable_tokenizer_info_endpoint:
            raise APIError(
                404,
                "GET /tokenizer_info is off: start the server with "
                "--enable-tokenizer-info-endpoint (it shows the tokenizer's configuration and "
                "chat template)",
                code="not_found",
            )
        check_api_key(request)
        return tokenizer_info(engine.tokenizer)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_api_key(request)
        check_healthy()
        return await respond(request, await parse(request, parse_completion_request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        check_healthy()
        return await respond(request, await parse(request, parse_chat_request))

    async def respond(request: Request, req: GenerateRequest):
        capacity = getattr(engine, "sequence_capacity", None)
        wanted = len(req.prompts) * req.params.n
        if capacity is not None and wanted > capacity:
            raise APIError(
                400,
                f"this request asks for {wanted} sequences (prompts x n); the server runs and "
                f"queues at most {capacity} at once",
                param="n",
            )
        prefix = "chatcmpl" if req.chat else "cmpl"
        response = ResponseShaper(
            engine, req, f"{prefix}-{uuid.uuid4().hex}", names[0], fingerprint
        )
        info = request_info(request)
        info.request_id = response.id
        info.prompt_tokens = sum(len(p) for p in req.prompts)
        ids = (
            [response.id]
            if len(req.prompts) == 1
            else [f"{response.id}-{i}" for i in range(len(req.prompts))]
        )
        gens = [
            Generation(engine, request, req, metrics, disconnect_poll_s, rid, i, state)
            for i, rid in enumerate(ids)
        ]
        handed_over = False
        try:
            # the first snapshots are awaited before any byte is sent, so prompt errors the
            # engine finds still get a proper status code, also for streams
            firsts = await _gather([g.next() for g in gens])
            if any(f is None for f in firsts):
                raise APIError(500, "the engine returned no output", "server_error")
            if req.stream:
                handed_over = True
                return _ClosingStreamingResponse(
                    stream_events(response, gens, firsts, info),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            finals = await _gather([g.final(f) for g, f in zip(gens, firsts, strict=True)])
            info.completion_tokens = _completion_tokens(finals)
            return JSONResponse(response.full(gens, finals))
        except ClientDisconnected:
            return JSONResponse(
                error_body("the client closed the connection", "client_closed"),
                status_code=STATUS_CLIENT_CLOSED,
            )
        finally:
            if not handed_over:
                for g in gens:
                    await g.close()

    async def stream_events(
        response: ResponseShaper,
        gens: list[Generation],
        firsts: list[RequestOutput],
        info: RequestInfo,
    ) -> AsyncIterator[str]:
        req = response.req
        state_ = _StreamState(response, len(gens) * req.params.n)
        finals = list(firsts)
        pending: dict[asyncio.Future, int] = {}
        try:
            if req.chat:
                yield response.chunk(
                    [
                        ChatStreamChoice(
                            index=i,
                            delta=DeltaMessage(role="assistant", content=""),
                            logprobs=None,
                            finish_reason=None,
                        )
                        for i in range(req.params.n)
                    ]
                )
            for i, (gen, out) in enumerate(zip(gens, firsts, strict=True)):
                for chunk in state_.deltas(gen, out):
                    yield chunk
                if not out.finished:
                    pending[asyncio.ensure_future(gen.next())] = i
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    out = task.result()
                    if out is None:
                        raise APIError(500, "the engine stream ended unfinished", "server_error")
                    finals[i] = out
                    info.completion_tokens = _completion_tokens(finals)
                    for chunk in state_.deltas(gens[i], out):
                        yield chunk
                    if not out.finished:
                        pending[asyncio.ensure_future(gens[i].next())] = i
            if req.include_usage:
                yield response.chunk([], usage=response.usage(finals))
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except APIError as e:  # headers are out: the error travels as an event
            metrics.count_error(e.status)
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            # Starlette cancels this generator when the client goes (anyio cancellation repeats
            # at every await): the clean-up must be shielded to run at all
            with anyio.CancelScope(shield=True):
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                for g in gens:
                    await g.close()

    return app


_NOT_FINGERPRINTED = ("progress", "worker_threads")


def system_fingerprint(engine: EngineClient) -> str:
    """vLLM's form of system_fingerprint, afd-VERSION[-TOPOLOGY]-HASH8: the version, the worker
    pools when the model is split across processes, and 8 hex digits of a hash of the engine
    settings (model, dtype, quantization, backends, ...), so a client can tell that the backend
    that produced its tokens changed."""
    # an AsyncEngine keeps its settings on the engine it drives
    config = getattr(engine, "config", None) or getattr(
        getattr(engine, "engine", None), "config", None
    )
    parts = [f"afd-{afd.__version__}"]
    if isinstance(config, EngineConfig):
        # what the launcher prints and how many threads a worker takes change no token
        settings = {k: v for k, v in config.flat().items() if k not in _NOT_FINGERPRINTED}
        c = config.cluster
        if c.num_attention_workers:
            parts += [f"p{c.num_prefill_workers}", f"a{c.num_attention_workers}",
                      f"f{c.num_expert_workers}", f"m{c.num_micro_batches}"]  # fmt: skip
    else:
        settings = {"model": engine.model_name, "max_model_len": engine.max_model_len}
    text = json.dumps(settings, sort_keys=True, default=str)
    parts.append(hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8])
    return "-".join(parts)


def _digest(value: str | bytes) -> bytes:
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(data).digest()


def _completion_tokens(outs: list[RequestOutput]) -> int:
    return sum(len(c.token_ids) for out in outs for c in out.outputs)


def serve(engine: EngineClient, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """Serve the API with uvicorn until SIGINT/SIGTERM (ServerConfig fields as keywords)."""
    config = ServerConfig(host=host, port=port, **settings)
    state = ServerState()
    app = build_app(engine, config, state=state)
    from afd.comm.net import listen_socket

    sock = listen_socket(config.host, config.port)
    try:
        make_server(app, config, state).run(sockets=[sock])
    finally:
        sock.close()

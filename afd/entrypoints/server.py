"""OpenAI-compatible HTTP API over an EngineClient: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics. Errors have OpenAI's shape (never FastAPI's 422), and a request
whose client went away is aborted in the engine so its KV blocks are freed."""

from __future__ import annotations

import asyncio
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
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afd.entrypoints.metrics import ServerMetrics
from afd.entrypoints.protocol import (
    APIError,
    EngineClient,
    GenerateRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
)
from afd.outputs import CompletionOutput, RequestOutput

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
    ):
        self.engine = engine
        self.request = request
        self.req = req
        self.metrics = metrics
        self.poll_s = poll_s
        self.request_id = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.start = time.monotonic()
        self._last_token_at = self.start
        self._num_tokens = 0
        self._stream = engine.generate(self.request_id, req.prompt_token_ids, req.params)
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
                if done:
                    break
                if await self.request.is_disconnected():
                    raise ClientDisconnected
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
            status = getattr(e, "http_status", None)
            if status is not None:  # e.g. the engine's admission queue is full: 503
                raise APIError(status, str(e), "service_unavailable") from e
            logger.warning("request %s failed in the engine: %r", self.request_id, e)
            raise APIError(500, f"the engine failed on this request: {e}", "server_error") from e
        self._record(out)
        return out

    def _record(self, out: RequestOutput) -> None:
        now = time.monotonic()
        # n > 1 sequences advance in lockstep: a step adds one token to each
        num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        new = num_tokens - self._num_tokens
        if new > 0:
            if self._num_tokens == 0:
                self.metrics.observe_first_token(
                    now - self.start, len(self.req.prompt_token_ids), new
                )
                if new > 1:
                    self.metrics.observe_tokens(0.0, new - 1)
            else:
                self.metrics.observe_tokens(now - self._last_token_at, new)
            self._num_tokens, self._last_token_at = num_tokens, now
        if out.finished and not self.finished:
            self.finished = True
            self.metrics.observe_finished(now - self.start, [c.finish_reason for c in out.outputs])

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


def usage_json(prompt_tokens: int, out: RequestOutput) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _token_text(engine: EngineClient, token_id: int) -> str:
    return engine.tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    # the engine's dict holds the top-k plus the sampled token when it is not among them
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs_json(
    engine: EngineClient,
    token_ids: list[int],
    entries: list[dict[int, float]],
    k: int,
    text_offset: int,
) -> dict[str, Any]:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_token_text(engine, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.get(t) for t, e in zip(token_ids, entries, strict=False)],
        "top_logprobs": [{_token_text(engine, i): v for i, v in _top(e, k)} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs_json(
    engine: EngineClient, token_ids: list[int], entries: list[dict[int, float]], k: int
) -> dict[str, Any]:
    """Chat logprobs: content[{token, logprob, bytes, top_logprobs[{token, logprob, bytes}]}]."""

    def item(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = _token_text(engine, token_id)
        return {
            "token": text,
            "logprob": logprob if logprob is not None else -9999.0,
            "bytes": list(text.encode("utf-8")),
        }

    return {
        "content": [
            {**item(t, e.get(t)), "top_logprobs": [item(i, v) for i, v in _top(e, k)]}
            for t, e in zip(token_ids, entries, strict=False)
        ]
    }


def _logprobs_json(
    engine: EngineClient,
    req: GenerateRequest,
    token_ids: list[int],
    entries: list[dict[int, float]] | None,
    text_offset: int,
) -> dict[str, Any] | None:
    if req.top_logprobs is None or entries is None:
        return None
    if req.chat:
        return chat_logprobs_json(engine, token_ids, entries, req.top_logprobs)
    return completion_logprobs_json(engine, token_ids, entries, req.top_logprobs, text_offset)


def full_response_json(engine: EngineClient, gen: Generation, out: RequestOutput) -> dict[str, Any]:
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        choice: dict[str, Any] = {"index": c.index}
        if gen.req.chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choice["logprobs"] = _logprobs_json(engine, gen.req, c.token_ids, c.logprobs, 0)
        choice["finish_reason"] = c.finish_reason
        choices.append(choice)
    return {
        "id": gen.request_id,
        "object": "chat.completion" if gen.req.chat else "text_completion",
        "created": gen.created,
        "model": engine.model_name,
        "choices": choices,
        "usage": usage_json(len(gen.req.prompt_token_ids), out),
    }


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _StreamState:
    """What has been sent for each choice, so each chunk carries only the new part."""

    def __init__(self, n: int):
        self.text_len = [0] * n
        self.num_tokens = [0] * n
        self.finished = [False] * n

    def deltas(
        self, engine: EngineClient, gen: Generation, out: RequestOutput
    ) -> list[dict[str, Any]]:
        chunks = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            chunk = self._delta(engine, gen, c)
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def _delta(
        self, engine: EngineClient, gen: Generation, c: CompletionOutput
    ) -> dict[str, Any] | None:
        i = c.index
        text = c.text[self.text_len[i] :]
        new_ids = c.token_ids[self.num_tokens[i] :]
        finish = c.finish_reason if not self.finished[i] else None
        if not text and finish is None:
            return None  # e.g. bytes of a partial UTF-8 character or a possible stop string
        entries = c.logprobs[self.num_tokens[i] :] if c.logprobs is not None else None
        logprobs = _logprobs_json(engine, gen.req, new_ids, entries, self.text_len[i])
        self.text_len[i] = len(c.text)
        self.num_tokens[i] = len(c.token_ids)
        self.finished[i] = self.finished[i] or finish is not None
        choice: dict[str, Any] = {"index": i}
        if gen.req.chat:
            choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        return _chunk(engine, gen, [choice])


def _chunk(engine: EngineClient, gen: Generation, choices: list[dict]) -> dict[str, Any]:
    return {
        "id": gen.request_id,
        "object": "chat.completion.chunk" if gen.req.chat else "text_completion",
        "created": gen.created,
        "model": engine.model_name,
        "choices": choices,
    }


# -- the app ----------------------------------------------------------------------------------


def build_app(
    engine: EngineClient, api_key: str | None = None, *, disconnect_poll_s: float = 0.1
) -> FastAPI:
    """The FastAPI app; `api_key` guards /v1/* with 'Authorization: Bearer KEY'."""
    app = FastAPI(title="AFD", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics()
    app.state.metrics = metrics
    app.state.engine = engine

    def error_response(e: APIError) -> JSONResponse:
        metrics.request_errors.inc(status=e.status)
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
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        ):
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

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        ok, reason = engine.health()
        if ok and reason == "ok":
            return JSONResponse({"status": "ok"})
        if ok:  # a worker is being replaced: requests wait a little, nothing is lost
            return JSONResponse({"status": "recovering", "reason": reason})
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics_page():
        try:
            stats = engine.stats()
            failures = getattr(engine, "failure_stats", None)
            if failures is not None:
                metrics.update_failures(failures())
        except Exception as e:  # a scrape must still show the server's own metrics
            logger.warning("engine.stats() failed: %r", e)
            stats = {}
        return PlainTextResponse(
            metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    def model_card() -> dict[str, Any]:
        return {
            "id": engine.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "afd",
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_api_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(request: Request, model: str):
        check_api_key(request)
        if model != engine.model_name:
            raise APIError(
                404, f"the model '{model}' does not exist", param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_api_key(request)
        check_healthy()
        req = parse_completion_request(await read_json(request), engine)
        return await respond(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request)
        check_healthy()
        req = parse_chat_request(await read_json(request), engine)
        return await respond(request, req)

    async def respond(request: Request, req: GenerateRequest) -> Response:
        gen = Generation(engine, request, req, metrics, disconnect_poll_s)
        handed_over = False
        try:
            # the first snapshot is awaited before any byte is sent, so prompt errors the
            # engine finds still get a proper status code, also for streams
            first = await gen.next()
            if first is None:
                raise APIError(500, "the engine returned no output", "server_error")
            if req.stream:
                handed_over = True
                return _ClosingStreamingResponse(
                    stream_events(gen, first),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            final = first
            while not final.finished:
                out = await gen.next()
                if out is None:
                    raise APIError(500, "the engine stream ended unfinished", "server_error")
                final = out
            return JSONResponse(full_response_json(engine, gen, final))
        except ClientDisconnected:
            return JSONResponse(
                error_body("the client closed the connection", "client_closed"),
                status_code=STATUS_CLIENT_CLOSED,
            )
        finally:
            if not handed_over:
                await gen.close()

    async def stream_events(gen: Generation, first: RequestOutput) -> AsyncIterator[str]:
        state = _StreamState(gen.req.params.n)
        out: RequestOutput | None = first
        final = first
        try:
            if gen.req.chat:
                role = {"role": "assistant", "content": ""}
                yield sse(
                    _chunk(
                        engine,
                        gen,
                        [
                            {"index": i, "delta": role, "logprobs": None, "finish_reason": None}
                            for i in range(gen.req.params.n)
                        ],
                    )
                )
            while out is not None:
                final = out
                for chunk in state.deltas(engine, gen, out):
                    yield sse(chunk)
                if out.finished:
                    break
                out = await gen.next()
            if not final.finished:
                raise APIError(500, "the engine stream ended unfinished", "server_error")
            if gen.req.include_usage:
                usage_chunk = _chunk(engine, gen, [])
                usage_chunk["usage"] = usage_json(len(gen.req.prompt_token_ids), final)
                yield sse(usage_chunk)
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except APIError as e:  # headers are out: the error travels as an event
            metrics.request_errors.inc(status=e.status)
            yield sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            await gen.close()

    return app


def serve(
    engine: EngineClient,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the API with uvicorn until interrupted."""
    import uvicorn

    app = build_app(engine, api_key=api_key)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()

"""What completions and chat serving share: the app's state (`AppState`), one engine request
seen from the server (`Generation`), and `OpenAIServing`, which turns a request's engine
snapshots into a whole response or its SSE stream (admission, framing, usage, errors as events).
The choices are shaped by afd.entrypoints.serving_completion and .serving_chat."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from afd.engine.async_engine import EngineOverloadedError
from afd.entrypoints.metrics import ServerMetrics
from afd.entrypoints.protocol import (
    APIError,
    EngineClient,
    GenerateRequest,
    UsageInfo,
    error_body,
)
from afd.entrypoints.serving import RequestInfo, ServerConfig, ServerState, request_info
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling.structured import GRAMMAR_DEAD_END
from afd.version import __version__

logger = logging.getLogger("afd.entrypoints.server")

# nginx's "client closed request": nobody reads it, but access logs should not say 200
STATUS_CLIENT_CLOSED = 499
_NOT_FINGERPRINTED = ("progress", "num_threads_per_worker")


def auth_digest(value: str | bytes) -> bytes:
    """sha256 of an Authorization value: digests compare in constant time, whatever the key's
    length."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    return hashlib.sha256(data).digest()


def system_fingerprint(engine: EngineClient) -> str:
    """vLLM's form of system_fingerprint, afd-VERSION[-TOPOLOGY]-HASH8: the version, the worker
    pools when the model is split across processes, and 8 hex digits of a hash of the engine
    settings (model, dtype, quantization, backends, ...), so a client can tell that the backend
    that produced its tokens changed."""
    config = engine.config
    parts = [f"afd-{__version__}"]
    if config is not None:
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


@dataclass
class AppState:
    """What every route reads, in `app.state.afd`: the engine, the settings, the metrics and
    the server-wide state shared with the HTTP guard and the launcher."""

    engine: EngineClient
    config: ServerConfig
    server: ServerState
    metrics: ServerMetrics
    names: list[str]  # the served model names; the first is the one reported
    fingerprint: str
    disconnect_poll_s: float = 0.1
    created: int = field(default_factory=lambda: int(time.time()))  # the model cards'
    api_key_digest: bytes | None = None
    # parsing and tokenizing run in threads, a few at a time: a huge body never holds up the
    # event loop, and many huge bodies never hold every thread
    parse_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(2))

    @classmethod
    def create(
        cls,
        engine: EngineClient,
        config: ServerConfig,
        server: ServerState | None = None,
        disconnect_poll_s: float = 0.1,
    ) -> AppState:
        names = list(config.served_model_names or [engine.model_name])
        key = config.api_key
        return cls(
            engine=engine,
            config=config,
            server=server or ServerState(),
            metrics=ServerMetrics(names[0]),
            names=names,
            fingerprint=system_fingerprint(engine),
            disconnect_poll_s=disconnect_poll_s,
            api_key_digest=None if key is None else auth_digest(f"Bearer {key}"),
        )


class ClientDisconnected(Exception):
    """The HTTP client hung up before the request finished."""


class Generation:
    """One engine request seen from the server: pulls snapshots while watching the client,
    records latency metrics, and always leaves the engine clean (abort unless finished)."""

    def __init__(
        self, app: AppState, request: Request, req: GenerateRequest, request_id: str, index: int
    ):
        self.engine = app.engine
        self.state = app.server
        self.metrics = app.metrics
        self.poll_s = app.disconnect_poll_s
        self.request = request
        self.request_id = request_id
        self.prompt_index = index
        self.prompt_ids = req.prompts[index]
        self.start = time.monotonic()
        self._last_token_at = self._checked = self.start
        self._num_tokens = 0
        self._stream = self.engine.generate(request_id, self.prompt_ids, req.params)
        self._pending: asyncio.Future | None = None
        self.finished = False
        self.closed = False

    async def next(self) -> RequestOutput | None:
        """The next snapshot, or None once the engine stream ended. Raises ClientDisconnected,
        APIError(400) for ValueError from the engine, APIError(500) for any other failure."""
        task = asyncio.ensure_future(self._stream.__anext__())
        self._pending = task
        try:
            await self._wait(task)
        except BaseException:
            task.cancel()  # throws into the engine stream, whose cleanup aborts the request
            task.add_done_callback(_consume_result)
            raise
        self._pending = None
        try:
            out = task.result()
        except StopAsyncIteration:
            return None
        except Exception as e:
            raise self._api_error(e) from e
        self._record(out)
        return out

    async def _wait(self, task: asyncio.Future) -> None:
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
                return

    def _api_error(self, e: Exception) -> APIError:
        if isinstance(e, ValueError):
            return APIError(400, str(e), "invalid_request_error")
        if str(e).startswith(GRAMMAR_DEAD_END):  # the request's constraint, not the engine
            return APIError(400, str(e), "invalid_request_error", None,
                            "structured_output_dead_end")  # fmt: skip
        if isinstance(e, EngineOverloadedError):  # the engine's admission queue is full
            return APIError(503, str(e), "service_unavailable")
        logger.warning("request %s failed in the engine: %r", self.request_id, e)
        return APIError(500, f"the engine failed on this request: {e}", "server_error")

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


class ClosingStreamingResponse(StreamingResponse):
    """Starlette leaves the body generator suspended when the send fails (client gone); closing
    it here runs its `finally` now instead of at garbage collection, so the abort is prompt."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def top_logprobs(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely of a position's (token id, Logprob) pairs, most likely first."""
    # the engine's dict holds the top-k plus the sampled token when it is not among them
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]


Shown = tuple[str, list[int], list | None]  # text, token ids, logprob entries


class OpenAIServing:
    """One generate request (all its prompts and choices) from engine snapshots to an HTTP
    response; a subclass shapes the choices, their logprobs and the stream's first chunks."""

    id_prefix: ClassVar[str]
    response_type: ClassVar[type[BaseModel]]
    chunk_type: ClassVar[type[BaseModel]]

    def __init__(self, app: AppState, request: Request, req: GenerateRequest):
        self.app = app
        self.engine = app.engine
        self.request = request
        self.req = req
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = req.params.n

    # -- what a subclass shapes ---------------------------------------------------------------

    def choice(self, gen: Generation, out: RequestOutput, c: CompletionOutput) -> BaseModel:
        """One choice of the whole (non-streamed) response."""
        raise NotImplementedError

    def stream_choice(
        self, index: int, text: str, logprobs: Any, finish: str | None, stop: Any
    ) -> BaseModel:
        """One choice of a stream chunk: the new text and its logprobs."""
        raise NotImplementedError

    def format_logprobs(self, token_ids: list[int], entries: list, k: int, offset: int) -> Any:
        """The logprobs of `token_ids` (`offset`: where their text starts in the choice)."""
        raise NotImplementedError

    def stream_start(self) -> list[str]:
        """Events before any text."""
        return []

    def shown(self, c: CompletionOutput) -> Shown:
        """(text, token ids, logprob entries) of a choice's completion as the client sees it."""
        return c.text, list(c.token_ids), c.logprobs

    def echo_prefix(self, gen: Generation, out: RequestOutput) -> Shown:
        """(text, token ids, logprob entries) that a choice starts with before its completion."""
        return "", [], None

    # -- shared -------------------------------------------------------------------------------

    def choice_index(self, gen: Generation, c: CompletionOutput) -> int:
        # a batched completions request lists prompt 0's n choices, then prompt 1's, ...
        return gen.prompt_index * self.n + c.index

    def logprobs(self, token_ids: list[int], entries: list | None, offset: int) -> Any:
        if self.req.top_logprobs is None or entries is None:
            return None
        return self.format_logprobs(token_ids, entries, self.req.top_logprobs, offset)

    def token_text(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def usage(self, finals: list[RequestOutput]) -> UsageInfo:
        prompt = sum(len(p) for p in self.req.prompts)
        completion = sum(len(self.shown(c)[1]) for out in finals for c in out.outputs)
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def full(self, gens: list[Generation], finals: list[RequestOutput]) -> dict[str, Any]:
        """The whole response body."""
        choices = [
            self.choice(gen, out, c)
            for gen, out in zip(gens, finals, strict=True)
            for c in sorted(out.outputs, key=lambda c: c.index)
        ]
        body = self.response_type(
            id=self.id,
            created=self.created,
            model=self.app.names[0],
            choices=choices,
            system_fingerprint=self.app.fingerprint,
            usage=self.usage(finals),
        )
        return body.model_dump()

    def chunk(self, choices: list, usage: UsageInfo | None = None) -> str:
        """One stream event."""
        body = self.chunk_type(
            id=self.id, created=self.created, model=self.app.names[0], choices=choices
        )
        if usage is not None:
            body.usage = usage  # type: ignore[attr-defined]
        return f"data: {body.model_dump_json()}\n\n"

    def _check_capacity(self) -> None:
        capacity = self.engine.sequence_capacity
        wanted = len(self.req.prompts) * self.req.params.n
        if capacity is not None and wanted > capacity:
            raise APIError(
                400,
                f"this request asks for {wanted} sequences (prompts x n); the server runs and "
                f"queues at most {capacity} at once",
                param="n",
            )

    async def respond(self) -> Response:
        """Run the request in the engine: the whole response, or a stream of its chunks."""
        self._check_capacity()
        req = self.req
        info = request_info(self.request)
        info.request_id = self.id
        info.prompt_tokens = sum(len(p) for p in req.prompts)
        ids = [self.id]
        if len(req.prompts) > 1:
            ids = [f"{self.id}-{i}" for i in range(len(req.prompts))]
        gens = [Generation(self.app, self.request, req, rid, i) for i, rid in enumerate(ids)]
        handed_over = False
        try:
            # the first snapshots are awaited before any byte is sent, so prompt errors the
            # engine finds still get a proper status code, also for streams
            firsts = await gather_all([g.next() for g in gens])
            if any(f is None for f in firsts):
                raise APIError(500, "the engine returned no output", "server_error")
            if req.stream:
                handed_over = True
                return ClosingStreamingResponse(
                    self._events(gens, firsts, info),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            finals = await gather_all([g.final(f) for g, f in zip(gens, firsts, strict=True)])
            info.completion_tokens = completion_tokens(finals)
            return JSONResponse(self.full(gens, finals))
        except ClientDisconnected:
            return JSONResponse(
                error_body("the client closed the connection", "client_closed"),
                status_code=STATUS_CLIENT_CLOSED,
            )
        finally:
            if not handed_over:
                for g in gens:
                    await g.close()

    async def _events(
        self, gens: list[Generation], firsts: list[RequestOutput], info: RequestInfo
    ) -> AsyncIterator[str]:
        stream = _StreamState(self, len(gens) * self.n)
        finals = list(firsts)
        pending: dict[asyncio.Future, int] = {}
        try:
            for chunk in self.stream_start():
                yield chunk
            for i, (gen, out) in enumerate(zip(gens, firsts, strict=True)):
                for chunk in stream.deltas(gen, out):
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
                    info.completion_tokens = completion_tokens(finals)
                    for chunk in stream.deltas(gens[i], out):
                        yield chunk
                    if not out.finished:
                        pending[asyncio.ensure_future(gens[i].next())] = i
            if self.req.include_usage:
                yield self.chunk([], usage=self.usage(finals))
            yield "data: [DONE]\n\n"
        except ClientDisconnected:
            return
        except APIError as e:  # headers are out: the error travels as an event
            self.app.metrics.count_error(e.status)
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


class _StreamState:
    """What has been sent for each choice, so each chunk carries only the new part."""

    def __init__(self, serving: OpenAIServing, num_choices: int):
        self.serving = serving
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
        s = self.serving
        i = s.choice_index(gen, c)
        own_text, own_ids, own_entries = s.shown(c)
        text = own_text[self.text_len[i] :]
        new_ids = own_ids[self.num_tokens[i] :]
        finish = c.finish_reason if not self.finished[i] else None
        entries = own_entries[self.num_tokens[i] :] if own_entries is not None else None
        echo_text, echo_ids, echo_entries = s.echo_prefix(gen, out)
        offset = len(echo_text) + self.text_len[i]  # where the new text starts in the choice
        if not self.started[i]:
            # an echoed prompt leads the choice's first chunk
            offset = 0
            text, new_ids = echo_text + text, echo_ids + list(new_ids)
            if echo_entries is not None and entries is not None:
                entries = echo_entries + list(entries)
        if not text and finish is None:
            return None  # e.g. bytes of a partial UTF-8 character or a possible stop string
        logprobs = s.logprobs(new_ids, entries, offset)
        self.started[i] = True
        self.text_len[i] = len(own_text)
        self.num_tokens[i] = len(own_ids)
        self.finished[i] = self.finished[i] or finish is not None
        stop_reason = c.stop_reason if finish is not None else None
        return s.chunk([s.stream_choice(i, text, logprobs, finish, stop_reason)])


async def gather_all(coros: list) -> list:
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


def completion_tokens(outs: list[RequestOutput]) -> int:
    return sum(len(c.token_ids) for out in outs for c in out.outputs)

"""The HTTP layer under the OpenAI routes, made so that no client can stall it: a body size
limit (413, from Content-Length before a byte is read), header and body read deadlines for
half-sent requests (the connection is closed / 408), a budget for bodies buffered at once,
X-Request-Id, one log line per request, draining on shutdown (503), and the uvicorn server that
runs it all on a socket bound before the engine starts (listen_socket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import operator
import os
import re
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import HTTPConnection
from uvicorn.protocols.http.h11_impl import H11Protocol

from afd.options import check_choice, check_int, check_text, is_number, number, option

access_logger = logging.getLogger("afd.request")

# what a client's X-Request-Id may be to be echoed: visible ASCII, bounded (it goes into logs)
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
# probes and scrapes: logged at DEBUG, so a 1 Hz health check does not flood the log
_QUIET_PATHS = ("/health", "/metrics")
MAX_HEADER_BYTES = 64 * 1024
# routes that still answer while the server drains
_DRAIN_PATHS = ("/health", "/metrics", "/version")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _api_key_from_env() -> str | None:
    return os.environ.get("AFD_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def _mb_to_bytes(mb: float) -> int:
    # NaN and inf become 0, which the range check refuses with the flag's message
    return int(mb * 2**20) if math.isfinite(mb) else 0


def _check_timeout(flag: str, value: Any) -> None:
    if not is_number(value) or not 0 < value <= 86400:  # also NaN and inf
        raise ValueError(f"{flag} must be a number of seconds in (0, 86400]")


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer enforces and where it listens (the `afd serve` flags)."""

    served_model_names: list[str] | None = option(  # None: the engine's model name
        None,
        "names requests may give as 'model'; the first is the one reported (default: the "
        "model as given)",
        name="--served-model-name",
        nargs="+",
        metavar="NAME",
        scope="server",
    )
    host: str = option("127.0.0.1", "address the HTTP API listens on", scope="server")
    port: int = option(8000, "port of the HTTP API", scope="server")
    api_key: str | None = option(
        None,
        "require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
        "(default: $AFD_API_KEY, else $VLLM_API_KEY, else no key)",
        flag_default=_api_key_from_env,
        scope="server",
    )
    protect_metrics: bool = option(  # /metrics needs the API key too
        False, "require the API key on /metrics too", scope="server"
    )
    # admission: sequences waiting beyond the running batch before new requests get 503
    max_queue_len: int = option(
        1024,
        "sequences (n per request) waiting beyond --max-num-seqs are refused with HTTP 503",
        scope="server",
    )
    max_body_bytes: int = option(
        16 * 2**20,
        "larger request bodies get HTTP 413 before they are read",
        name="--max-request-body-mb",
        flag_default=16.0,
        parse=number,
        to_field=_mb_to_bytes,
        scope="server",
    )
    header_timeout_s: float = option(  # request line and headers, from connect or last response
        10.0,
        "a connection that has not sent a whole request line and headers this long "
        "after it opened (or after its last response) is closed",
        name="--http-header-timeout-s",
        scope="server",
    )
    body_timeout_s: float = option(  # the whole body, from the end of the headers
        60.0,
        "a request body not complete this long after its headers gets HTTP 408",
        name="--http-body-timeout-s",
        scope="server",
    )
    shutdown_timeout_s: float = option(  # in-flight requests may finish this long, then abort
        20.0,
        "seconds SIGINT/SIGTERM lets running requests finish before aborting them; new "
        "ones get 503 at once, a second signal stops at once",
        name="--shutdown-timeout",
        scope="server",
    )
    log_requests: bool = option(
        True,
        "no log line per request (id, status, tokens, latency)",
        name="--disable-log-requests",
        flag_default=False,
        to_field=operator.not_,
        scope="server",
    )
    log_level: str = option(
        "info",
        "level of AFD's log (stderr): requests are logged at info",
        choices=LOG_LEVELS,
        scope="server",
    )
    uvicorn_log_level: str = option(
        "warning", "level of uvicorn's own log", choices=("trace", *LOG_LEVELS), scope="server"
    )
    # GET /tokenizer_info (vLLM's --enable-tokenizer-info-endpoint): off, it is a 404
    enable_tokenizer_info_endpoint: bool = option(
        False,
        "serve GET /tokenizer_info: the tokenizer's configuration and chat template, as "
        "vLLM does (lm-eval's tokenizer_backend=remote reads it); off by default (a 404)",
        scope="server",
    )

    def __post_init__(self) -> None:
        if self.api_key is not None:
            check_text("--api-key", self.api_key)
            if not re.fullmatch(r"[\x21-\x7e]+", self.api_key):
                raise ValueError(
                    "--api-key must be visible ASCII without spaces (it travels in a header)"
                )
        names = self.served_model_names
        if names is not None:
            for name in names:
                check_text("--served-model-name", name)
            if len(set(names)) != len(names):
                raise ValueError("--served-model-name lists a name twice")
        check_text("--host", self.host)
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"--port must be 1..65535, got {self.port}")
        check_int("--max-queue-len", self.max_queue_len, 1, 1 << 30)
        if not isinstance(self.max_body_bytes, int) or not 1024 <= self.max_body_bytes <= 2**40:
            raise ValueError("--max-request-body-mb must be between 0.001 and 1048576")
        _check_timeout("--http-header-timeout-s", self.header_timeout_s)
        _check_timeout("--http-body-timeout-s", self.body_timeout_s)
        _check_timeout("--shutdown-timeout", self.shutdown_timeout_s)
        check_choice("log level", self.log_level, LOG_LEVELS)
        check_choice("uvicorn log level", self.uvicorn_log_level, ("trace", *LOG_LEVELS))

    @property
    def body_budget_bytes(self) -> int:
        """Bodies buffered by all requests at once; beyond it new bodies get 503."""
        return 8 * self.max_body_bytes


@dataclass
class ServerState:
    """Mutable server-wide state shared by the middleware, the routes and the launcher."""

    draining: bool = False  # a shutdown began: new requests get 503
    abort_in_flight: bool = False  # the shutdown deadline passed: running requests are aborted
    buffered_bytes: int = 0


@dataclass
class RequestInfo:
    """Per-request facts the routes fill in for the log line and the X-Request-Id header."""

    request_id: str | None = None
    client_request_id: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_info(scope_or_request: Any) -> RequestInfo:
    """The RequestInfo of a request (a Starlette Request or an ASGI scope)."""
    scope = (
        scope_or_request.scope if isinstance(scope_or_request, HTTPConnection) else scope_or_request
    )
    info = scope.setdefault("state", {}).get("afd")
    if info is None:
        info = scope["state"]["afd"] = RequestInfo()
    return info


def _json_error(status: int, message: str, type_: str, code: str | None = None) -> bytes:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return json.dumps(body).encode()


class HTTPGuard:
    """ASGI middleware in front of the app (see the module docstring)."""

    def __init__(self, app, config: ServerConfig, state: ServerState, on_error=None):
        self.app = app
        self.config = config
        self.state = state
        self.on_error = on_error  # callback(status) for the metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        info = request_info(scope)
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if _REQUEST_ID.match(text):
                    info.client_request_id = text
        sent = {"started": False, "done": False, "close": False}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                sent["started"] = True
                info.status = message["status"]
                rid = info.client_request_id or info.request_id or f"req-{uuid.uuid4().hex}"
                info.request_id = info.request_id or rid
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode("latin-1")))
                if sent["close"]:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent["done"] = True
            await send(message)

        async def reply(status: int, message: str, type_: str, code: str | None = None) -> None:
            sent["close"] = True  # the rest of the request is never read: no keep-alive
            if self.on_error is not None:
                self.on_error(status)
            body = _json_error(status, message, type_, code)
            await send_wrapper(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send_wrapper({"type": "http.response.body", "body": body})

        budget_taken = 0
        try:
            # h11 bounds a head that trickles in (16 KB), not one that comes in one read
            if sum(len(n) + len(v) for n, v in scope["headers"]) > MAX_HEADER_BYTES:
                await reply(431, "the request headers are too large", "invalid_request_error")
                return
            if self.state.draining and scope["path"] not in _DRAIN_PATHS:
                await reply(503, "the server is shutting down", "service_unavailable")
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body, budget_taken = await self._read_body(scope, receive, reply)
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.buffered_bytes -= budget_taken
            if self.config.log_requests:
                self._log(scope, info, sent, start)

    async def _read_body(self, scope, receive, reply) -> tuple[bytes | None, int]:
        """The whole body within the size limit and the body deadline; None after answering
        413 / 408 / 503 (or when the client left)."""
        limit = self.config.max_body_bytes
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                with contextlib.suppress(ValueError):
                    length = int(value)
        too_big = (
            f"the request body is larger than this server's limit of {limit} bytes "
            "(--max-request-body-mb)"
        )
        if length is not None and length > limit:
            await reply(413, too_big, "invalid_request_error", "request_too_large")
            return None, 0
        deadline = time.monotonic() + self.config.body_timeout_s
        chunks: list[bytes] = []
        size = taken = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await reply(
                    408,
                    f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                    "invalid_request_error",
                    "request_timeout",
                )
                return None, taken
            if message["type"] == "http.disconnect":
                return None, taken
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await reply(413, too_big, "invalid_request_error", "request_too_large")
                return None, taken
            if chunk:
                if self.state.buffered_bytes + len(chunk) > self.config.body_budget_bytes:
                    await reply(
                        503,
                        "too many large request bodies at once; retry later",
                        "service_unavailable",
                    )
                    return None, taken
                self.state.buffered_bytes += len(chunk)
                taken += len(chunk)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), taken

    @staticmethod
    def _log(scope, info: RequestInfo, sent: dict, start: float) -> None:
        if not sent["started"]:
            status = 499  # the client left before any answer (nginx's "client closed request")
        elif not sent["done"]:
            status = 499 if info.status == 200 else info.status  # a stream cut short
        else:
            status = info.status
        level = logging.DEBUG if scope["path"] in _QUIET_PATHS else logging.INFO
        if not access_logger.isEnabledFor(level):
            return
        client = scope.get("client")
        where = f"{client[0]}:{client[1]}" if client else "-"
        tokens = ""
        if info.prompt_tokens is not None:
            tokens = (
                f" prompt_tokens={info.prompt_tokens}"
                f" completion_tokens={info.completion_tokens or 0}"
            )
        access_logger.log(
            level,
            '%s %s "%s %s" %s%s %.3fs',
            info.client_request_id or info.request_id or "-",
            where,
            scope["method"],
            scope["path"],
            status,
            tokens,
            time.monotonic() - start,
        )


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then the client's own messages (so a
    disconnect is still seen)."""
    given = False

    async def wrapped():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers: a connection
    that has not sent a whole request head `header_timeout_s` after it connected (or after its
    previous response) is closed. uvicorn's keep-alive timer stops at the first byte, so a
    client trickling headers would otherwise hold its connection for ever."""

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        self._arm_header_timer()
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        waiting_after = self.cycle  # a new request replaces the cycle
        self._header_timer = self.loop.call_later(
            self.header_timeout_s, self._header_deadline, waiting_after
        )

    def _header_deadline(self, waiting_after) -> None:
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


class AFDServer(uvicorn.Server):
    """uvicorn.Server whose SIGINT/SIGTERM drain instead of waiting for every generation: new
    requests get 503 at once, running ones may finish for `shutdown_timeout_s`, then they are
    aborted; a second signal stops at once. The signal is not raised again afterwards, so the
    launcher's own clean-up runs."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout_s: float):
        super().__init__(config)
        self.afd_state = state
        self.shutdown_timeout_s = shutdown_timeout_s
        self.signalled: int | None = None
        self._abort_timer: threading.Timer | None = None

    def begin_shutdown(self, reason: str = "") -> None:
        """Stop admitting now; abort what still runs after the shutdown timeout."""
        if self.afd_state.draining:
            return
        self.afd_state.draining = True
        self.should_exit = True
        logging.getLogger("afd.entrypoints.server").info(
            "shutting down%s: running requests get %.0f s to finish",
            f" ({reason})" if reason else "",
            self.shutdown_timeout_s,
        )
        self._abort_timer = threading.Timer(self.shutdown_timeout_s, self.abort_in_flight)
        self._abort_timer.daemon = True
        self._abort_timer.start()

    def abort_in_flight(self) -> None:
        self.afd_state.abort_in_flight = True

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
        if self.signalled is None:
            self.signalled = sig
            self.begin_shutdown(signal.Signals(sig).name)
        else:  # a second signal: stop now
            self.abort_in_flight()
            self.force_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._abort_timer is not None:
                self._abort_timer.cancel()


def make_server(
    app, config: ServerConfig, state: ServerState, log_level: str = "warning"
) -> AFDServer:
    """The uvicorn server for `app` with AFD's HTTP limits (run it with sockets=[...])."""
    protocol = type(
        "TimedH11Protocol", (TimedH11Protocol,), {"header_timeout_s": config.header_timeout_s}
    )
    uv_config = uvicorn.Config(
        app,
        http=protocol,
        log_level=log_level,
        access_log=False,  # AFD logs one line per request itself
        lifespan="off",
        # a backstop: in-flight requests are aborted at shutdown_timeout_s by the server
        timeout_graceful_shutdown=config.shutdown_timeout_s + 3.0,
    )
    return AFDServer(uv_config, state, config.shutdown_timeout_s)

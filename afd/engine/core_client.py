"""The API process's side of the engine core: `start_core` launches `python -m afd.engine.core`,
and `CoreClient` is the server's EngineClient over ZMQ (afd.entrypoints.protocol): it sends
tokenized requests and aborts, turns each step's deltas into cumulative RequestOutputs, and
answers health and stats from the status the core publishes. A core that dies fails every open
request at once and makes health False (HTTP 503); nothing waits on it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from afd.comm import cleanup
from afd.config import EngineConfig
from afd.engine import core_records as rec
from afd.engine.async_engine import EngineDeadError, EngineOverloadedError, RequestFailedError
from afd.engine.core import pid_alive
from afd.engine.core_output import OutputProcessor, TokenTexts
from afd.outputs import LogprobsEntry, RequestOutput
from afd.sampling.params import SamplingParams
from afd.tokenizer import Tokenizer, load_chat_template

# no status from a live core this long: it is taken for hung (its status thread runs beside
# the step loop, so a long step does not stop it)
STATUS_TIMEOUT_S = 30.0
POLL_MS = 100


@dataclass(frozen=True)
class CoreAddresses:
    """Where a core listens; `folder` holds the ipc sockets (removed with the core)."""

    folder: str
    input: str
    status: str

    @classmethod
    def at(cls, folder: str) -> CoreAddresses:
        return cls(folder, f"ipc://{folder}/input", f"ipc://{folder}/status")

    @classmethod
    def in_new_folder(cls) -> CoreAddresses:
        return cls.at(cleanup.owned_dir("core"))

    def output(self, client: int) -> str:
        return f"ipc://{self.folder}/output-{client}"


class CoreProcess:
    """A started core: its process and addresses; `stop` asks it to exit, then makes sure."""

    def __init__(self, config: EngineConfig, max_queue_len: int, log_level: str = "info"):
        self.addresses = CoreAddresses.in_new_folder()
        spec = rec.CoreSpec(
            config, max_queue_len, self.addresses.input, self.addresses.status, os.getpid()
        )
        env = dict(os.environ, AFD_LOG_LEVEL=log_level)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "afd.engine.core"], stdin=subprocess.PIPE, env=env
        )
        assert self.process.stdin is not None
        self.process.stdin.write(rec.encode(spec))
        self.process.stdin.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 30.0) -> None:
        """Shutdown message, then SIGTERM, then SIGKILL; the ipc folder goes."""
        if self.process.poll() is None and timeout > 0:
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.PUSH)
            sock.connect(self.addresses.input)
            sock.send(rec.encode(rec.Shutdown()))
            sock.close(linger=1000)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.terminate()  # the core unwinds (its workers too) as on Ctrl-C
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.addresses.folder, ignore_errors=True)


class CoreStartError(RuntimeError):
    """The core exited before it was ready (it printed why); `exit_code` is its own."""

    exit_code = 1


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]
    params: SamplingParams
    texts: OutputProcessor | None = None  # made by the receiving thread, at the first delta
    prompt_logprobs: list[LogprobsEntry | None] | None = None
    done: bool = False


class CoreClient:
    """An EngineClient talking to a core process (API process `client` of several)."""

    def __init__(self, addresses: CoreAddresses, core_pid: int, client: int = 0):
        self.addresses, self.core_pid, self.client = addresses, core_pid, client
        self.core: CoreProcess | None = None  # set when this client owns the core
        self.ctx = zmq.Context()
        self._push = self.ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 0)
        self._push.connect(addresses.input)
        self._push_lock = threading.Lock()
        self._pull = self.ctx.socket(zmq.PULL)
        self._pull.bind(addresses.output(client))
        self._sub = self.ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(addresses.status)
        self._streams: dict[str, _Stream] = {}
        self.error: str | None = None
        self._status = rec.Status(True, "ok", {}, {})
        self._status_at = time.monotonic()
        self._stop = threading.Event()
        self._send(rec.Hello(client, os.getpid(), addresses.output(client)))
        welcome = self._wait_welcome()
        self.config = welcome.config
        self.max_model_len = welcome.max_model_len
        self.sequence_capacity = welcome.sequence_capacity
        self.model_name = self.model_root = welcome.config.source.model
        self.eos_token_ids = frozenset(welcome.eos_token_ids)
        self.tokenizer = Tokenizer.from_pretrained(welcome.tokenizer_path)
        if welcome.config.source.chat_template is not None:
            self.tokenizer.set_chat_template(
                load_chat_template(welcome.config.source.chat_template)
            )
        self._texts = TokenTexts(self.tokenizer)
        self._thread = threading.Thread(target=self._loop, name="afd-core-client", daemon=True)
        self._thread.start()

    def _send(self, msg: Any) -> None:
        frame = rec.encode(msg)
        with self._push_lock:
            self._push.send(frame)

    def _wait_welcome(self) -> rec.Welcome:
        while True:  # loading the model takes what it takes; a core that dies ends the wait
            if self._pull.poll(POLL_MS):
                msg = rec.from_core.decode(self._pull.recv())
                if isinstance(msg, rec.Welcome):
                    return msg
            if not pid_alive(self.core_pid):
                self.close()
                raise CoreStartError("the engine core exited before it was ready")

    # ---- EngineClient ---------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        if self.error is not None:
            return False, self.error
        return self._status.ok, self._status.reason

    def stats(self) -> dict[str, float]:
        return dict(self._status.stats)

    def failure_stats(self) -> dict[str, Any]:
        return dict(self._status.failure_stats)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(self.error)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), prompt_token_ids, params)
        self._streams[request_id] = stream
        try:
            self._send(
                rec.AddRequest(self.client, request_id, prompt_token_ids, params, time.monotonic())
            )
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._streams.pop(request_id, None) is not None and self.error is None:
                self._send(rec.Abort(self.client, [request_id]))

    async def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self.error is None:
            self._send(rec.Abort(self.client, [request_id]))

    # ---- the receiving thread -------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self._sub in ready:
                self._read_status()
            if self._pull in ready:
                self._read_outputs()
            if self.error is None:
                self._check_core()

    def _read_status(self) -> None:
        while True:
            try:
                frame = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._status = rec.status_decoder.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            self._status_at = time.monotonic()

    def _read_outputs(self) -> None:
        """Every frame waiting; their snapshots reach each event loop in one callback (one
        wake-up per step, where one per stream and step woke the API process's loop 16 times
        at 16 streams)."""
        ready: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        while True:
            try:
                frame = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = rec.from_core.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(msg, rec.Outputs):
                for delta in msg.requests:
                    self._apply(delta, ready)
        for loop, items in ready.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _apply(self, delta: rec.RequestDelta, ready: dict) -> None:
        stream = self._streams.get(delta.request_id)
        if stream is None or stream.done:
            return  # aborted or finished here meanwhile, or not ours
        if delta.error is not None:
            item: Any = _error(delta)
        else:
            if stream.texts is None:
                stream.texts = OutputProcessor(
                    self.tokenizer,
                    stream.prompt_token_ids,
                    stream.params,
                    self.eos_token_ids,
                    self._texts,
                )
            item = _advance(stream, delta)
        stream.done = delta.finished or delta.error is not None or item.finished
        ready.setdefault(stream.loop, []).append((stream.queue, item))

    def _check_core(self) -> None:
        if not pid_alive(self.core_pid):
            self._fail("the engine core process died")
        elif time.monotonic() - self._status_at > STATUS_TIMEOUT_S:
            self._fail(f"the engine core sent no status for {STATUS_TIMEOUT_S:.0f} s")

    def _fail(self, why: str) -> None:
        self.error = why
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(why))

    def close(self) -> None:
        """Stop the receiving thread and close the sockets (the core goes on)."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=2)
        for sock in (self._push, self._pull, self._sub):
            sock.close(linger=0)
        self.ctx.term()

    def shutdown(self) -> None:
        """close(), and stop the core when this client started it."""
        self.close()
        if self.core is not None:
            self.core.stop()


def start_core_client(config: EngineConfig, max_queue_len: int, log_level: str) -> CoreClient:
    """A core process for `config` and this process's client of it (which stops it)."""
    return connect_core(CoreProcess(config, max_queue_len, log_level))


def connect_core(core: CoreProcess) -> CoreClient:
    """This process's client of a started `core`, once it is ready; the client stops it."""
    try:
        client = CoreClient(core.addresses, core.pid)
    except CoreStartError as e:
        e.exit_code = core.process.wait()
        core.stop(timeout=0)
        raise
    except BaseException:  # Ctrl-C while loading too: the core unwinds its workers
        core.stop(timeout=0)
        raise
    client.core = core
    return client


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _error(delta: rec.RequestDelta) -> BaseException:
    why = delta.error or "failed"
    if delta.error_kind == "invalid":
        return ValueError(why)
    if delta.error_kind == "overloaded":
        return EngineOverloadedError(why)
    if delta.error_kind == "dead":
        return EngineDeadError(why)
    return RequestFailedError(why)


def _advance(stream: _Stream, delta: rec.RequestDelta) -> RequestOutput:
    """The next cumulative snapshot (fresh lists: an earlier snapshot does not change)."""
    texts = stream.texts
    assert texts is not None
    for d in delta.seqs:
        texts.add(d.index, d.token_ids, d.logprobs, d.finish_reason, d.stop_reason)
    if delta.prompt_logprobs is not None:
        stream.prompt_logprobs = [
            None if e is None else texts.texts.named(e) for e in delta.prompt_logprobs
        ]
    return RequestOutput(
        delta.request_id,
        None,
        stream.prompt_token_ids,
        list(texts.outputs),
        texts.finished,
        stream.prompt_logprobs,
        None,
        texts.metrics(delta.metrics),
    )

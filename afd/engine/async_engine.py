"""The engine behind the HTTP server: one thread steps the engine; asyncio callers await outputs."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from afd.config import EngineConfig
from afd.outputs import RequestOutput
from afd.sampling.params import SamplingParams

if TYPE_CHECKING:
    from afd.engine.llm_engine import LLMEngine


class EngineOverloadedError(RuntimeError):
    """Admission refused: the bounded queue is full (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a worker died for good or a step failed)."""


class RequestFailedError(RuntimeError):
    """This request failed alone (e.g. its sampling raised on a worker); the engine goes on."""


class AddCommand(msgspec.Struct, frozen=True):
    """Engine thread: admit a tokenized request (already validated by `generate`)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortCommand(msgspec.Struct, frozen=True):
    """Engine thread: stop a request and free its KV blocks (an unknown id is ignored)."""

    request_id: str


EngineCommand = AddCommand | AbortCommand


class AsyncEngine:
    """Thread-safe front of LLMEngine: `generate` yields cumulative outputs, `abort` frees; the
    server's afd.entrypoints.protocol.EngineClient."""

    def __init__(self, config: EngineConfig, max_queue_len: int = 1024):
        from afd.engine.llm_engine import LLMEngine  # torch: the error classes need none

        self.engine: LLMEngine = LLMEngine(config)
        self.config = config
        self.max_queue_len = max_queue_len
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = self.model_root = config.source.model
        # admission counts sequences (a request with n = 8 is 8), running or queued
        self.sequence_capacity = max_queue_len + config.limits.max_num_seqs
        self._num_seqs = 0
        self._commands: queue.SimpleQueue[EngineCommand] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="afd-engine", daemon=True)
        self._thread.start()

    def health(self) -> tuple[bool, str]:
        """(can serve, reason): a worker being replaced is still healthy ("recovering: ...");
        a cluster that cannot heal (restart budget spent) is not, also while no request runs."""
        if self.error is None:  # not kept: a cluster waiting for a lost node may serve again
            return self.engine.executor.health()
        return False, self.error

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def failure_stats(self) -> dict[str, Any]:
        return self.engine.failure_stats()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(self.error)
        self.engine.validate_prompt(prompt_token_ids)
        if params.structured_outputs is not None:
            # compiling a grammar may take a while: not on the event loop, nor in the engine
            # thread (which then finds it in the cache)
            await asyncio.to_thread(self.engine.validate_params, params)
        else:
            self.engine.validate_params(params)
        if self._num_seqs + params.n > self.sequence_capacity:
            raise EngineOverloadedError(
                f"the server is at capacity ({self._num_seqs} sequences in flight, at most "
                f"{self.sequence_capacity}); retry later"
            )
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._num_seqs += params.n
        self._commands.put(AddCommand(request_id, prompt_token_ids, params))
        self._wake.set()
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._num_seqs -= params.n
            if self._streams.pop(request_id, None) is not None:
                self._commands.put(AbortCommand(request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(AbortCommand(request_id))
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self, cmd: EngineCommand) -> None:
        if isinstance(cmd, AddCommand):
            try:
                self.engine.add_request(cmd.prompt_token_ids, cmd.params, request_id=cmd.request_id)
            except ValueError as e:
                self._deliver(cmd.request_id, e)
        else:
            self.engine.abort_request(cmd.request_id)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                self._apply(cmd)
            try:
                if not eng.has_unfinished_requests():
                    eng.maintain()  # heal a worker that failed while idle
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs = eng.step()
            except Exception as e:  # the engine is unusable now: fail every open request
                self.error = f"engine step failed: {e}"
                for rid in list(self._streams):
                    self._deliver(rid, EngineDeadError(self.error))
                return
            for out in outputs:
                failed = out.error is not None
                self._deliver(out.request_id, RequestFailedError(out.error) if failed else out)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.engine.shutdown()

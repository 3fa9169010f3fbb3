"""The engine-core process: it owns LLMEngine (scheduler, executor, request state) and serves
API processes over ZMQ with the records of afd.engine.core_records, so the HTTP event loops
and the step loop do not share a GIL (vLLM v1's split). One thread steps; a second publishes
status. `python -m afd.engine.core` reads a CoreSpec from stdin."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import zmq

from afd.engine import core_records as rec
from afd.outputs import RequestOutput

logger = logging.getLogger("afd.engine.core")

STATUS_INTERVAL_S = 0.2
IDLE_POLL_MS = 50


@dataclass
class _Client:
    """An API process: where its outputs go and which requests are its."""

    pid: int
    socket: zmq.Socket
    requests: set[str] = field(default_factory=set)


@dataclass
class _Sent:
    """What a request's API process already has: tokens per sequence."""

    client: int
    num_seqs: int
    tokens: list[int]
    prompt_logprobs_sent: bool = False


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class EngineCore:
    """The step loop behind the sockets; `run` returns once told to shut down."""

    def __init__(self, spec: rec.CoreSpec):
        from afd.engine.llm_engine import LLMEngine  # torch: not in the API processes' imports

        self.engine = LLMEngine(spec.config, detokenize=False)  # text: the API's
        self.capacity = spec.max_queue_len + spec.config.limits.max_num_seqs
        self.parent_pid = spec.parent_pid
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PULL)
        self.input.bind(spec.input_address)
        self.status_socket = self.ctx.socket(zmq.PUB)
        self.status_socket.bind(spec.status_address)
        self.clients: dict[int, _Client] = {}
        self.sent: dict[str, _Sent] = {}
        self.num_seqs = 0
        self.error: str | None = None
        self.stop = threading.Event()
        self._gone: queue.SimpleQueue[int] = queue.SimpleQueue()  # dead API processes
        # a grammar compiles beside the loop (the cache then has it), so streams go on meanwhile
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="afd-core-grammar")
        self._compiling: set[str] = set()
        self._compiled: queue.SimpleQueue[rec.AddRequest] = queue.SimpleQueue()
        self._status = threading.Thread(target=self._publish, name="afd-core-status", daemon=True)

    def welcome(self) -> bytes:
        eng = self.engine
        return rec.encode(
            rec.Welcome(
                eng.config,
                str(eng.tokenizer_path),
                eng.max_model_len,
                self.capacity,
                sorted(eng.eos_token_ids),
            )
        )

    # ---- the step loop ----------------------------------------------------------------------
    def run(self) -> None:
        self._status.start()
        eng = self.engine
        while not self.stop.is_set():
            busy = self.error is None and eng.has_unfinished_requests()
            if self.input.poll(0 if busy else IDLE_POLL_MS):
                self._drain_input()
            while not self._gone.empty():
                self._drop_client(self._gone.get())
            while not self._compiled.empty():
                msg = self._compiled.get()
                if msg.request_id in self._compiling:  # not aborted meanwhile
                    self._compiling.discard(msg.request_id)
                    self._add(msg)
            if self.error is not None or self.stop.is_set():
                continue
            try:
                if not eng.has_unfinished_requests():
                    eng.maintain()  # heal a worker that failed while idle
                    continue
                outputs = eng.step()
            except Exception as e:  # the engine is unusable now: fail every open request
                self.error = f"engine step failed: {e}"
                logger.error("%s", self.error)
                self._fail_all()
                continue
            self._send_outputs(outputs)

    def _drain_input(self) -> None:
        while True:
            try:
                frame = self.input.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = rec.to_core.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("dropped a malformed frame from an API process: %s", e)
                continue
            self._handle(msg)

    def _handle(self, msg: rec.ToCore) -> None:
        if isinstance(msg, rec.AddRequest):
            if msg.params.structured_outputs is None:
                self._add(msg)
            elif msg.request_id not in self._compiling:
                self._compiling.add(msg.request_id)
                self._compiler.submit(self._compile, msg)
        elif isinstance(msg, rec.Abort):
            for rid in msg.request_ids:
                self._compiling.discard(rid)
                sent = self.sent.get(rid)
                if sent is not None and sent.client == msg.client:
                    self._forget(rid)
                    self.engine.abort_request(rid)
        elif isinstance(msg, rec.Hello):
            self._hello(msg)
        else:
            self.stop.set()

    def _compile(self, msg: rec.AddRequest) -> None:
        try:
            self.engine.validate_params(msg.params)
        except ValueError:
            pass  # _add says why, to the client
        finally:
            self._compiled.put(msg)

    def _hello(self, msg: rec.Hello) -> None:
        old = self.clients.pop(msg.client, None)
        if old is not None:  # the same slot again: a restarted API process
            self._drop_requests(old)
            old.socket.close(linger=0)
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(msg.output_address)
        self.clients[msg.client] = _Client(msg.pid, sock)
        sock.send(self.welcome())

    def _add(self, msg: rec.AddRequest) -> None:
        client = self.clients.get(msg.client)
        if client is None:
            logger.warning("a request from API process %d, which said no hello", msg.client)
            return
        rid, params, eng = msg.request_id, msg.params, self.engine
        kind, why = None, None
        try:
            if self.error is not None:
                kind, why = "dead", self.error
            else:  # the order AsyncEngine checks in: the request first, then admission
                eng.validate_prompt(msg.prompt_token_ids)
                eng.validate_params(params)
                if self.num_seqs + params.n > self.capacity:
                    kind = "overloaded"
                    why = (
                        f"the server is at capacity ({self.num_seqs} sequences in flight, at "
                        f"most {self.capacity}); retry later"
                    )
                else:
                    eng.add_request(msg.prompt_token_ids, params, request_id=rid)
        except ValueError as e:
            kind, why = "invalid", str(e)
        if kind is not None:
            delta = rec.RequestDelta(rid, [], True, why, kind)
            client.socket.send(rec.encode(rec.Outputs([delta])))
            return
        eng.requests[rid].arrival_time = msg.arrival
        self.num_seqs += params.n
        self.sent[rid] = _Sent(msg.client, params.n, [0] * params.n)
        client.requests.add(rid)

    def _forget(self, rid: str) -> None:
        sent = self.sent.pop(rid, None)
        if sent is not None:
            self.num_seqs -= sent.num_seqs
            client = self.clients.get(sent.client)
            if client is not None:
                client.requests.discard(rid)

    def _drop_requests(self, client: _Client) -> None:
        for rid in list(client.requests):
            self._forget(rid)
            self.engine.abort_request(rid)

    def _drop_client(self, index: int) -> None:
        client = self.clients.pop(index, None)
        if client is not None:
            logger.warning("API process %d (pid %d) is gone: its %d request(s) are aborted",
                           index, client.pid, len(client.requests))  # fmt: skip
            self._drop_requests(client)
            client.socket.close(linger=0)

    # ---- outputs ----------------------------------------------------------------------------
    def _send_outputs(self, outputs: list[RequestOutput]) -> None:
        per_client: dict[int, list[rec.RequestDelta]] = {}
        for out in outputs:
            sent = self.sent.get(out.request_id)
            if sent is None:
                continue
            per_client.setdefault(sent.client, []).append(self._delta(out, sent))
            if out.finished:
                self._forget(out.request_id)
        for index, deltas in per_client.items():
            client = self.clients.get(index)
            if client is not None:
                client.socket.send(rec.encode(rec.Outputs(deltas)))

    @staticmethod
    def _delta(out: RequestOutput, sent: _Sent) -> rec.RequestDelta:
        seqs = []
        for c in out.outputs:
            start = sent.tokens[c.index]
            logprobs = c.logprobs[start:] if c.logprobs is not None else None
            seqs.append(
                rec.SeqDelta(c.index, c.token_ids[start:], logprobs, c.finish_reason, c.stop_reason)
            )
            sent.tokens[c.index] = len(c.token_ids)
        prompt_logprobs = None
        pl = out.prompt_logprobs
        if pl is not None and not sent.prompt_logprobs_sent:
            if out.finished or all(e is not None for e in pl[1:]):
                prompt_logprobs, sent.prompt_logprobs_sent = pl, True
        kind = "failed" if out.error is not None else None
        return rec.RequestDelta(
            out.request_id, seqs, out.finished, out.error, kind, prompt_logprobs, out.metrics
        )

    def _fail_all(self) -> None:
        for client in self.clients.values():
            deltas = [
                rec.RequestDelta(rid, [], True, self.error, "dead") for rid in client.requests
            ]
            if deltas:
                client.socket.send(rec.encode(rec.Outputs(deltas)))
        for rid in list(self.sent):
            self._forget(rid)

    # ---- status -----------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        if self.error is None:  # not kept: a cluster waiting for a lost node may serve again
            return self.engine.executor.health()
        return False, self.error

    def _publish(self) -> None:
        """Health and stats for every API process; notices a dead launcher (the core then
        stops: no orphan) and dead API processes (their requests are aborted)."""
        while not self.stop.is_set():
            ok, reason = self.health()
            status = rec.Status(ok, reason, self.engine.stats(), self.engine.failure_stats())
            self.status_socket.send(rec.encode(status))
            if not pid_alive(self.parent_pid):
                logger.error("the launcher (pid %d) is gone: stopping", self.parent_pid)
                self.stop.set()
            for index, client in list(self.clients.items()):
                if not pid_alive(client.pid):
                    self._gone.put(index)
            self.stop.wait(STATUS_INTERVAL_S)

    def shutdown(self) -> None:
        self.stop.set()
        self._status.join(timeout=2 * STATUS_INTERVAL_S + 1)
        self._compiler.shutdown(wait=False, cancel_futures=True)
        try:
            self.engine.shutdown()
        finally:
            for client in self.clients.values():
                client.socket.close(linger=0)
            self.input.close(linger=0)
            self.status_socket.close(linger=0)
            self.ctx.term()


def main() -> int:
    """Run a core from the CoreSpec on stdin until told to shut down (SIGTERM too; SIGINT is
    the launcher's: it drains the API first, then stops the core)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = rec.spec_decoder.decode(sys.stdin.buffer.read())
    from afd.process import raise_interrupt, setup_logging
    from afd.scheduler.cluster.executor import print_plan
    from afd.threads import set_torch_threads, thread_plan

    setup_logging(os.environ.get("AFD_LOG_LEVEL", "info"))
    # SIGTERM while loading unwinds, so workers and temp folders are cleaned up
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        print_plan(spec.config)  # here: the launcher starts this process before it imports
        set_torch_threads(thread_plan(spec.config.cluster).engine)  # the API server's are not
        core = EngineCore(spec)  # taken from it: it runs 1 (see afd.threads)
    except ValueError as e:  # a user error (the model, a setting): exit 2, as the CLI's
        print(f"afd: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (RuntimeError, TimeoutError, OSError) as e:  # a worker failed to start
        print(f"afd: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    signal.signal(signal.SIGTERM, lambda *_: core.stop.set())
    started = time.monotonic()
    try:
        core.run()
    finally:
        core.shutdown()
    logger.info("engine core stopped after %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())

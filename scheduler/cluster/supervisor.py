"""Worker processes: spawn, watch, report deaths (with the child's exception text), and shut
everything down with no orphans, also when the parent is signalled or dies.

* Children start with the "spawn" context and run `_child_entry`, which reports an uncaught
  exception to the parent as a `Crashed` record over a one-way pipe (never a pickled object).
* A monitor thread waits on every child's sentinel and error pipe; the first failure is
  recorded (and `on_failure` called) within a fraction of a second.
* Children leave when the parent goes: they hold the read end of a lifeline pipe whose only
  writer is the parent, so EOF means the parent is gone (SIGKILL included); getppid() is checked
  too.
* The parent shuts its children down on shutdown(), at exit, and on SIGTERM/SIGINT (handlers
  chain to the previous ones).
* Self-healing (enable_restarts): a worker that dies (exit code other than 0) is started again
  with the same target and arguments (same role and rank), at most `RestartPolicy.max_restarts`
  times within `window_s`; past that the failure is fatal and check() raises.
* Hung workers: each child's heartbeat thread reports every HEARTBEAT_S how long its main
  thread made no progress (afd.comm.liveness); a child silent or stuck for longer than
  `worker_timeout_s` is killed (and so replaced like a dead one).
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from afd.comm import wire
from afd.comm.messages import Crashed, Heartbeat

MAX_ERROR_CHARS = 8000
HEARTBEAT_S = 0.5


@dataclass
class WorkerProcess:
    role: str
    rank: int
    process: mp.process.BaseProcess
    errors: mpc.Connection | None = None  # parent's read end of the child's status pipe
    target: Callable | None = None
    args: tuple = ()
    last_heartbeat: float | None = None  # None until the child's first one (imports take time)
    stuck_s: float = 0.0  # the child's last report: seconds its main thread made no progress
    hung: str | None = None  # why the supervisor killed it

    @property
    def label(self) -> str:
        return f"{self.role} worker {self.rank} (pid {self.process.pid})"


@dataclass
class RestartPolicy:
    """At most `max_restarts` replacements within any `window_s` seconds (per supervisor, so
    per node); then a failure is fatal."""

    max_restarts: int = 5
    window_s: float = 600.0
    times: collections.deque = field(default_factory=collections.deque)

    def allow(self, now: float) -> bool:
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return False
        self.times.append(now)
        return True


@dataclass
class Restart:
    """One replacement: the failure and the new process."""

    failure: WorkerFailure
    worker: WorkerProcess
    time: float


@dataclass
class WorkerFailure:
    """Why a worker stopped: exit description plus the child's exception text, if it sent one."""

    role: str
    rank: int
    pid: int | None
    exitcode: int | None
    error: str | None

    def describe(self) -> str:
        text = f"{self.role} worker {self.rank} (pid {self.pid}) {exit_description(self.exitcode)}"
        lines = [line for line in (self.error or "").splitlines() if line.strip()]
        return f"{text}: {lines[-1].strip()}" if lines else text  # the exception line


class WorkerDiedError(RuntimeError):
    """A worker process exited while the cluster needed it."""


def exit_description(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()
_previous_handlers: dict[int, object] = {}


def _on_signal(signum: int, frame) -> None:
    for sup in list(_live):
        sup.shutdown(grace=0.0)
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is _on_signal:
            continue
        _previous_handlers[signum] = current
        signal.signal(signum, _on_signal)


class Supervisor:
    """Owns the worker processes of one cluster."""

    def __init__(
        self,
        on_failure: Callable[[WorkerFailure], None] | None = None,
        handle_signals: bool = True,
        restart_policy: RestartPolicy | None = None,
        worker_timeout_s: float | None = None,
    ) -> None:
        self.ctx = mp.get_context("spawn")
        self.workers: list[WorkerProcess] = []  # the current process of every (role, rank)
        self.retired: list[WorkerProcess] = []  # processes that were replaced
        self.on_failure = on_failure
        self.failures: list[WorkerFailure] = []
        self.restart_policy = restart_policy
        self.restarting = False  # set by enable_restarts(), once the cluster is up
        self.restarts: list[Restart] = []
        self.fatal: WorkerFailure | None = None
        self.worker_timeout_s = worker_timeout_s
        self._closed = False
        self._lock = threading.RLock()  # RLock: shutdown may run from a signal handler
        self._read_lock = threading.Lock()
        self._failed = threading.Event()
        self._stop = threading.Event()
        self._errors: dict[int, str] = {}  # pid -> exception text sent by the child
        self._reported: set[int] = set()  # pids whose death was recorded
        self._lifeline_read, self._lifeline_write = self.ctx.Pipe(duplex=False)
        self._wake_read, self._wake_write = self.ctx.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._watch, name="afd-supervisor", daemon=True)
        self._monitor.start()
        _live.add(self)
        atexit.register(self.shutdown)
        if handle_signals:
            _install_signal_handlers()

    def enable_restarts(self) -> None:
        """From now on a dead worker is replaced (within the restart policy)."""
        self.restarting = self.restart_policy is not None

    def spawn(self, role: str, rank: int, target: Callable, *args) -> WorkerProcess:
        """Start target(*args) in a new process (spawn context; target and args must pickle)."""
        worker = self._start(role, rank, target, args)
        with self._lock:
            self.workers.append(worker)
        self._wake_write.send_bytes(b"w")  # the monitor picks up the new sentinel
        return worker

    def _start(self, role: str, rank: int, target: Callable, args: tuple) -> WorkerProcess:
        if self._closed:
            raise RuntimeError("supervisor is shut down")
        err_read, err_write = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_child_entry,
            args=(os.getpid(), self._lifeline_read, err_write, target, *args),
            name=f"afd-{role}-{rank}",
            daemon=True,
        )
        proc.start()
        err_write.close()  # the child holds the only writer: EOF on exit
        return WorkerProcess(role, rank, proc, err_read, target, args)

    # ---- watching --------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                watched = {
                    w.process.sentinel: w
                    for w in self.workers
                    if w.process.pid not in self._reported
                }
                pipes = {w.errors: w for w in self.workers if w.errors is not None}
            try:
                ready = mpc.wait([self._wake_read, *watched, *pipes], timeout=HEARTBEAT_S)
            except OSError:
                continue  # a handle was closed under us during shutdown
            self._kill_hung()
            for obj in ready:
                if obj is self._wake_read:
                    try:
                        self._wake_read.recv_bytes()
                    except (EOFError, OSError):
                        return
                elif obj in pipes:
                    self._read_error(pipes[obj])
                elif obj in watched:
                    self._record_death(watched[obj])

    def _read_error(self, worker: WorkerProcess) -> None:
        with self._read_lock:
            if worker.errors is not None:
                self._read_error_locked(worker)

    def _read_error_locked(self, worker: WorkerProcess) -> None:
        try:
            msg = wire.decode_to_supervisor(worker.errors.recv_bytes(maxlength=1 << 20))
            if isinstance(msg, Heartbeat):
                worker.last_heartbeat = time.monotonic()
                worker.stuck_s = msg.stuck
                return
            if msg.error:
                self._errors[worker.process.pid] = msg.error[:MAX_ERROR_CHARS]
        except (EOFError, OSError, ValueError):  # WireError is a ValueError
            with self._lock:
                conn, worker.errors = worker.errors, None
            conn.close()

    def _kill_hung(self) -> None:
        """SIGKILL a worker whose heartbeat stopped (e.g. SIGSTOP) or whose main thread has
        made no progress for worker_timeout_s (e.g. a deadlock); its death is then handled
        like any other."""
        limit = self.worker_timeout_s
        if limit is None or self._closed:
            return
        now = time.monotonic()
        with self._lock:
            current = [w for w in self.workers if w.hung is None and w.process.is_alive()]
        for w in current:
            if w.last_heartbeat is None:
                continue  # still starting up; the driver's start-up timeout covers that
            silent = now - w.last_heartbeat
            if silent > limit:
                w.hung = f"hung: no heartbeat for {silent:.1f} s (--worker-timeout-s {limit:g})"
            elif w.stuck_s > limit:
                w.hung = f"hung: no progress for {w.stuck_s:.1f} s (--worker-timeout-s {limit:g})"
            else:
                continue
            print(f"afd: {w.label} {w.hung}; killing it", file=sys.stderr, flush=True)
            try:
                os.kill(w.process.pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass

    def _record_death(self, worker: WorkerProcess) -> None:
        worker.process.join(timeout=1.0)
        if worker.errors is not None:  # the child wrote its error before exiting: drain it
            while worker.errors is not None and worker.errors.poll(0):
                self._read_error(worker)
        failure = WorkerFailure(
            worker.role,
            worker.rank,
            worker.process.pid,
            worker.process.exitcode,
            worker.hung or self._errors.get(worker.process.pid),
        )
        with self._lock:
            self._reported.add(worker.process.pid)
            if self._closed:
                return
            self.failures.append(failure)
        replaced = self._maybe_restart(worker, failure)
        if not replaced:
            self._failed.set()
        if self.on_failure is not None:
            try:
                self.on_failure(failure)
            except Exception:
                traceback.print_exc()

    def _maybe_restart(self, worker: WorkerProcess, failure: WorkerFailure) -> bool:
        """Replace a worker that failed (same role, rank, target and arguments) when the
        policy allows; otherwise the failure is fatal. A worker that exited 0 was told to stop
        and is not replaced."""
        if not self.restarting or worker.process.exitcode == 0 or worker not in self.workers:
            return False
        now = time.monotonic()
        if not self.restart_policy.allow(now):
            self.fatal = failure
            policy = self.restart_policy
            print(f"afd: {failure.describe()}; restart budget exhausted ({policy.max_restarts} "
                  f"in {policy.window_s:g} s)", file=sys.stderr, flush=True)  # fmt: skip
            return False
        try:
            new = self._start(worker.role, worker.rank, worker.target, worker.args)
        except Exception as e:  # e.g. shutting down
            self.fatal = failure
            print(f"afd: cannot replace {worker.label}: {e}", file=sys.stderr, flush=True)
            return False
        with self._lock:
            self.workers[self.workers.index(worker)] = new
            self.retired.append(worker)
            self.restarts.append(Restart(failure, new, now))
        if worker.errors is not None:
            worker.errors.close()
            worker.errors = None
        return True

    def wait_for_failure(self, timeout: float | None = None) -> WorkerFailure | None:
        """Block until some worker died (returns the first failure) or the timeout passed."""
        self._failed.wait(timeout)
        return self.failures[0] if self.failures else None

    def check(self) -> None:
        """Raise WorkerDiedError naming the first worker that is gone for good (with its error
        text); a worker being replaced is not gone."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal.describe())
        for w in list(self.workers):
            if self.restarting and (w.process.exitcode or w.process.is_alive()):
                continue  # alive, or dead and about to be replaced by the monitor
            if not w.process.is_alive():
                pid = w.process.pid
                if w.errors is not None and pid not in self._errors:
                    while w.errors is not None and w.errors.poll(0):
                        self._read_error(w)
                failure = WorkerFailure(
                    w.role, w.rank, pid, w.process.exitcode, self._errors.get(pid)
                )
                raise WorkerDiedError(failure.describe())

    # ---- teardown --------------------------------------------------------------------------
    def shutdown(self, grace: float = 3.0) -> None:
        """Give workers `grace` seconds to exit, then SIGTERM, then SIGKILL; reaps them all."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + grace
        everyone = self.workers + self.retired
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in everyone:
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + 2.0
        for w in everyone:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=2.0)
        self._stop.set()
        try:
            self._wake_write.send_bytes(b"s")
        except OSError:
            pass
        self._monitor.join(timeout=2.0)
        for conn in (self._lifeline_write, self._lifeline_read, self._wake_write):
            conn.close()
        for w in everyone:
            if w.errors is not None:
                w.errors.close()
                w.errors = None
        _live.discard(self)


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks instead of returning them to the kernel. By default every
    freed tensor above 128 KiB is unmapped, so the next one page-faults again: with per-layer
    temporaries of a few MiB that was a third of a decode step on CPU. False where not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling; blocks below come from the heap
    ok &= mallopt(m_trim_threshold, 1 << 30)
    ok &= mallopt(m_top_pad, 64 << 20)
    return bool(ok)


def _child_entry(parent_pid: int, lifeline, errors, target: Callable, *args) -> None:
    # A worker must never outlive the process that started it (SIGKILL of the parent included).
    def watch_parent() -> None:
        while True:
            try:
                if lifeline.poll(0.5):
                    lifeline.recv_bytes()  # the parent never writes: this raises EOFError
            except (EOFError, OSError):
                os._exit(1)
            if os.getppid() != parent_pid:
                os._exit(1)

    pipe_lock = threading.Lock()

    def heartbeat() -> None:
        # reports progress of the main thread (afd.comm.liveness); a stopped process sends none
        from afd.comm import liveness

        while True:
            time.sleep(HEARTBEAT_S)
            try:
                with pipe_lock:
                    errors.send_bytes(wire.encode(Heartbeat(float(liveness.stuck_for()))))
            except (OSError, ValueError):
                return

    threading.Thread(target=watch_parent, name="afd-parent-watch", daemon=True).start()
    threading.Thread(target=heartbeat, name="afd-heartbeat", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us
    keep_freed_memory()
    try:
        target(*args)
    except SystemExit:
        raise
    except BaseException as e:
        text = "".join(traceback.format_exception(e))[-MAX_ERROR_CHARS:]
        try:
            with pipe_lock:
                errors.send_bytes(wire.encode(Crashed(text)))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        with pipe_lock:
            errors.close()

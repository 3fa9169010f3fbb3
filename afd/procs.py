"""Worker processes: spawn, watch, report deaths, and shut everything down (no orphans)."""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class WorkerProcess:
    role: str
    rank: int
    process: mp.process.BaseProcess

    @property
    def label(self) -> str:
        return f"{self.role} worker {self.rank} (pid {self.process.pid})"


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


class Supervisor:
    """Owns the worker processes of one cluster."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.workers: list[WorkerProcess] = []
        self._closed = False
        atexit.register(self.shutdown)

    def spawn(self, role: str, rank: int, target: Callable, *args) -> WorkerProcess:
        proc = self.ctx.Process(
            target=_child_entry,
            args=(os.getpid(), target, *args),
            name=f"afd-{role}-{rank}",
            daemon=True,
        )
        proc.start()
        worker = WorkerProcess(role, rank, proc)
        self.workers.append(worker)
        return worker

    def check(self) -> None:
        """Raise WorkerDiedError naming the first worker that is gone."""
        for w in self.workers:
            if not w.process.is_alive():
                raise WorkerDiedError(f"{w.label} {exit_description(w.process.exitcode)}")

    def shutdown(self, grace: float = 3.0) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + grace
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
        for w in self.workers:
            w.process.join(timeout=2.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=2.0)


def _child_entry(parent_pid: int, target: Callable, *args) -> None:
    # A worker must never outlive the process that started it (SIGKILL of the parent included).
    def watch_parent() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops us
    target(*args)

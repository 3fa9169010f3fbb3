"""Worker-side liveness: a progress stamp the supervisor's heartbeat reads, and the hook that
lets a worker abandon a step when the driver asks (see docs/structures.md, "Failures").

* `beat()` marks progress: the main loop waiting for a plan, a data-plane wait (which can be
  abandoned, so it counts as responsive), or a compute segment (a layer) that finished.
* `stuck_for()` is how long the main thread made no progress; the heartbeat thread
  (afd.scheduler.supervisor) reports it, and the worker's supervisor kills a worker stuck for
  longer than --worker-timeout-s. A SIGSTOPped worker sends no heartbeat at all.
* `check()` (called inside every data-plane wait) beats and runs the interrupt hook, which
  raises StepAborted when the driver has sent a message in the middle of a step.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

_last: float | None = None  # monotonic time of the last beat; None until start()
_allowance = 0.0  # seconds a bounded blocking call (e.g. a rendezvous) may take
_interrupt: Callable[[], None] | None = None


class StepAborted(Exception):
    """The driver sent a message (abort, re-form, shutdown) while a step was running."""


def start() -> None:
    """Begin watching (after start-up: loading weights has its own time limit)."""
    beat()


def beat() -> None:
    global _last
    _last = time.monotonic()


def stuck_for() -> float:
    """Seconds the main thread has gone without progress (0 before start())."""
    if _last is None:
        return 0.0
    return max(0.0, time.monotonic() - _last - _allowance)


@contextlib.contextmanager
def bounded(seconds: float):
    """A blocking call that cannot beat but gives up by itself within `seconds`."""
    global _allowance
    beat()
    _allowance = seconds
    try:
        yield
    finally:
        _allowance = 0.0
        beat()


def set_interrupt(hook: Callable[[], None] | None) -> None:
    """The function check() calls; it raises StepAborted to abandon the step."""
    global _interrupt
    _interrupt = hook


def check() -> None:
    """Called while waiting on a peer: counts as progress, and may raise StepAborted."""
    beat()
    if _interrupt is not None:
        _interrupt()


class _Waiter:
    """A helper thread that blocks in work.wait() so the main thread can keep checking for an
    abort: gloo's point-to-point requests report completion only from wait(), and a wait on a
    peer that died or hangs may never return. One per data-plane generation (see drop_waits)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="afd-dist-wait", daemon=True).start()

    def _run(self) -> None:
        while True:
            work, done, box = self.jobs.get()
            try:
                work.wait()
            except BaseException as e:  # handed to the waiting main thread
                box.append(e)
            done.set()


_waiter: _Waiter | None = None


def drop_waits() -> None:
    """Forget waits of an abandoned generation (their helper thread may stay blocked)."""
    global _waiter
    _waiter = None


def wait_work(work, device=None) -> None:
    """Wait for a torch.distributed request, checking for an abort meanwhile. On CUDA (NCCL)
    wait() only orders the calling thread's stream and returns at once, so it stays here."""
    global _waiter
    # (no torch import here: every worker's heartbeat thread imports this module at start-up)
    if _interrupt is None or (device is not None and str(device).startswith("cuda")):
        work.wait()
        return
    if _waiter is None:
        _waiter = _Waiter()
    done, box = threading.Event(), []
    _waiter.jobs.put((work, done, box))
    while not done.wait(0.05):
        check()
    if box:
        raise box[0]

"""Worker-side liveness: a progress stamp the supervisor's heartbeat reads, and the hooks that
let a worker abandon a step when the driver asks (see docs/structures.md, "Failures").

* `beat()` marks progress: the main loop waiting for a plan, or a compute segment (a layer)
  that finished. A data-plane wait (`wait_work`, or `check()` in a polling wait) counts as
  progress too: it can be abandoned, so the worker is responsive.
* `stuck_for()` is how long the main thread made no progress; the heartbeat thread
  (afd.scheduler.cluster.supervisor) reports it, and the supervisor kills a worker stuck for
  longer than --worker-timeout-s. A SIGSTOPped worker sends no heartbeat at all.
* `check()` (called by polling waits, e.g. the shm transport's) beats and raises StepAborted
  when the driver has sent a message in the middle of a step.
* `wait_work` waits for a torch.distributed request on the calling thread. gloo's requests
  complete only inside `wait()`, a `wait(timeout)` that expires closes the pair, and neither
  `abort()` nor `shutdown()` of the process group ends a wait of another thread; so a watcher
  thread polls the driver while the main thread is blocked, and when a message came it breaks
  the wait through the world's `breaker` (afd.comm.dist.break_waits: a receive that times out
  on every pair, which fails every request pending on them). Handing each wait to a helper
  thread instead cost a thread wake-up per exchange on cores busy with compute (docs/structures.md).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

WATCH_S = 0.05  # how often the watcher looks for a driver message during a data-plane wait

_last: float | None = None  # monotonic time of the last beat; None until start()
_allowance = 0.0  # seconds a bounded blocking call (e.g. a rendezvous) may take
_driver_message: Callable[[], bool] | None = None
_waiting = False  # the main thread is blocked in wait_work
_breaker: Callable[[], None] | None = None  # ends the current world's pending requests
_break_lock = threading.Lock()  # a break and the world's teardown never overlap
_watcher: threading.Thread | None = None


class StepAborted(Exception):
    """The driver sent a message (abort, re-form, shutdown) while a step was running."""


def start() -> None:
    """Begin watching (after start-up: loading weights has its own time limit)."""
    beat()


def beat() -> None:
    global _last
    _last = time.monotonic()


def stuck_for() -> float:
    """Seconds the main thread has gone without progress (0 before start() and while it waits
    on a peer, which the watcher can always end)."""
    if _last is None or _waiting:
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


def set_interrupt(driver_message: Callable[[], bool] | None) -> None:
    """`driver_message()` says whether the driver sent a message mid-step (keeping it for the
    main loop); it is called from the main thread and from the watcher, so it must be safe in
    both."""
    global _driver_message
    _driver_message = driver_message


def set_breaker(breaker: Callable[[], None] | None) -> None:
    """The current world's breaker (None when the world is left); waits until a break in
    progress is over, so the caller may destroy the world afterwards."""
    global _breaker
    with _break_lock:
        _breaker = breaker


def check() -> None:
    """Called while waiting on a peer: counts as progress, and may raise StepAborted."""
    beat()
    if _driver_message is not None and _driver_message():
        raise StepAborted("the driver sent a message")


def _watch() -> None:
    global _breaker
    while True:
        time.sleep(WATCH_S)
        if not _waiting or _driver_message is None:
            continue
        with _break_lock:
            try:
                # once per world: the breaker closes every pair of it
                if _waiting and _breaker is not None and _driver_message():
                    breaker, _breaker = _breaker, None
                    breaker()
            except Exception:
                pass  # a world being torn down, or a message the main loop will report


def wait_work(work) -> None:
    """Wait for a torch.distributed request on this thread; when the driver sends a message
    meanwhile, the watcher breaks the wait and StepAborted is raised. (NCCL's wait() returns at
    once: it only orders the calling thread's CUDA stream.)"""
    global _waiting, _watcher
    if _driver_message is None:  # not a cluster worker: nobody to abandon the step for
        work.wait()
        return
    if _watcher is None:
        _watcher = threading.Thread(target=_watch, name="afd-wait-watch", daemon=True)
        _watcher.start()
    _waiting = True
    try:
        work.wait()
    except Exception:
        if _driver_message():  # broken by the watcher, or a peer that left for the same abort
            raise StepAborted("the driver sent a message") from None
        raise
    finally:
        beat()
        _waiting = False

"""A worker blocked in a gloo wait on the main thread (afd.comm.liveness.wait_work) abandons it
when the driver asks, whether the peer is idle but alive, stopped, or cannot take a large
send, and the next data-plane generation forms and works. Two real spawned processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow

HANG_GUARD_S = 30  # a wait that never ends would hold the test this long, then fail
DIST_TIMEOUT_S = 4 * HANG_GUARD_S  # gloo ends a wait by itself only after this


_store = None  # one TCP store per process (rank 0 hosts it), a key prefix per generation


def _world(rank: int, port: int, generation: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from afd.comm import dist as afd_dist

    global _store
    if _store is None:
        _store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                               timeout=timedelta(seconds=HANG_GUARD_S))  # fmt: skip
    afd_dist.init_world(rank, 2, store=dist.PrefixStore(f"g{generation}/", _store),
                        timeout_s=DIST_TIMEOUT_S)  # fmt: skip


def _waiter(port: int, case: str, abort, results) -> None:
    """Rank 0: blocks on rank 1 until the driver's message (`abort`) comes."""
    try:
        import torch
        import torch.distributed as dist

        from afd.comm import dist as afd_dist
        from afd.comm import liveness

        _world(0, port, 0)
        liveness.set_interrupt(abort.is_set)
        liveness.set_breaker(afd_dist.break_waits)
        liveness.start()
        if case == "big-send":  # more than the socket buffers hold: the peer never reads it
            work = dist.isend(torch.ones(16 << 20), 1, tag=7)
        else:
            work = dist.irecv(torch.empty(4), 1, tag=7)  # the peer never sends
        stuck: list[float] = []  # what the heartbeat thread would report during the wait
        watching = True

        def watch() -> None:
            while watching:
                if liveness._waiting:
                    if not stuck:  # the main thread is blocked in wait_work now
                        results.put(("waiting", os.getpid()))
                    stuck.append(liveness.stuck_for())
                time.sleep(0.05)

        threading.Thread(target=watch, daemon=True).start()
        try:
            liveness.wait_work(work)
            outcome = "returned"
        except liveness.StepAborted:
            outcome = "aborted"
        watching = False
        results.put((outcome, len(stuck), max(stuck, default=None)))
        liveness.set_breaker(None)
        afd_dist.destroy_world()
        _world(0, port, 1)  # the next generation
        got = torch.zeros(3)
        dist.recv(got, 1, tag=9)
        afd_dist.destroy_world()
        results.put(("next generation", got.tolist()))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def _peer(port: int, leave, results) -> None:
    """Rank 1: alive, never answers rank 0 in generation 0; joins generation 1 when told."""
    try:
        import torch
        import torch.distributed as dist

        from afd.comm import dist as afd_dist

        _world(1, port, 0)
        leave.wait(DIST_TIMEOUT_S)
        afd_dist.destroy_world()
        _world(1, port, 1)
        dist.send(torch.tensor([1.0, 2.0, 3.0]), 0, tag=9)
        afd_dist.destroy_world()
    except BaseException:
        results.put(("peer error", traceback.format_exc()))


@pytest.mark.parametrize("case", ["idle-peer", "stopped-peer", "big-send"])
def test_a_blocked_gloo_wait_is_abandoned_when_the_driver_asks(case):
    ctx = mp.get_context("spawn")
    port = free_port()
    abort, leave, results = ctx.Event(), ctx.Event(), ctx.Queue()
    waiter = ctx.Process(target=_waiter, args=(port, case, abort, results))
    peer = ctx.Process(target=_peer, args=(port, leave, results))
    waiter.start()
    peer.start()
    try:
        first = results.get(timeout=HANG_GUARD_S)
        assert first[0] == "waiting", first
        if case == "stopped-peer":
            os.kill(peer.pid, signal.SIGSTOP)
        abort.set()  # the driver's message
        outcome = results.get(timeout=HANG_GUARD_S)
        assert outcome[0] not in ("error", "peer error"), outcome[1]
        status, samples, max_stuck = outcome
        assert status == "aborted"
        assert samples > 0 and max_stuck == 0.0, "a worker waiting on a peer must not look hung"
        if case == "stopped-peer":
            os.kill(peer.pid, signal.SIGCONT)
        leave.set()
        outcome = results.get(timeout=HANG_GUARD_S)
        assert outcome == ("next generation", [1.0, 2.0, 3.0]), outcome
    finally:
        for p in (waiter, peer):
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
            p.join(HANG_GUARD_S)
            if p.is_alive():
                p.kill()
                p.join()
    assert waiter.exitcode == 0 and peer.exitcode == 0

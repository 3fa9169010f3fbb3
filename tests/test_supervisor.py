"""Process supervision: failures reported with their cause, no orphans on any exit path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from afd.scheduler.cluster.supervisor import RestartPolicy, Supervisor, WorkerDiedError


def _raise_after(delay: float) -> None:
    time.sleep(delay)
    raise ValueError("boom from the worker")


def _stuck_main_thread() -> None:
    from afd.comm import liveness

    liveness.start()
    time.sleep(60)  # like a deadlock: the heartbeat thread runs, the main thread makes no progress


def _ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def _gone(pid: int) -> bool:
    """True when pid no longer runs (reaped, or a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)
    except FileNotFoundError:
        return True


def _ignores_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


@pytest.mark.slow
def test_child_exception_reaches_parent(bound):
    failures = []
    sup = Supervisor(on_failure=failures.append, handle_signals=False)
    try:
        sup.spawn("expert", 3, _raise_after, 0.2)
        sup.spawn("attention", 0, time.sleep, 30)
        t0 = time.monotonic()
        failure = sup.wait_for_failure(timeout=20)
        assert failure is not None, "no failure reported"
        assert time.monotonic() - t0 < bound(10)
        assert (failure.role, failure.rank, failure.exitcode) == ("expert", 3, 1)
        assert "ValueError: boom from the worker" in failure.error
        assert "_raise_after" in failure.error  # the traceback came along
        assert failures and failures[0] is failure
        with pytest.raises(WorkerDiedError, match="expert worker 3 .*exited with code 1.*boom"):
            sup.check()
    finally:
        sup.shutdown(grace=0.0)
    assert all(_gone(w.process.pid) for w in sup.workers)


@pytest.mark.slow
def test_sigkilled_child_is_detected():
    sup = Supervisor(handle_signals=False)
    try:
        victim = sup.spawn("attention", 1, time.sleep, 30)
        sup.spawn("expert", 2, time.sleep, 30)
        sup.check()  # all alive
        os.kill(victim.process.pid, signal.SIGKILL)
        failure = sup.wait_for_failure(timeout=10)
        assert failure is not None and failure.rank == 1
        assert failure.exitcode == -signal.SIGKILL and failure.error is None
        assert "killed by SIGKILL" in failure.describe()
        with pytest.raises(WorkerDiedError, match="attention worker 1 .*SIGKILL"):
            sup.check()
    finally:
        sup.shutdown(grace=0.0)


@pytest.mark.slow
def test_shutdown_leaves_no_child(bound):
    sup = Supervisor(handle_signals=False)
    stubborn = sup.spawn("expert", 0, _ignore_sigterm_and_sleep)
    plain = sup.spawn("attention", 0, time.sleep, 60)
    # let the stubborn child install its handler (slow to start on a loaded machine)
    assert _wait_for(lambda: _ignores_sigterm(stubborn.process.pid), 30)
    pids = [stubborn.process.pid, plain.process.pid]
    assert not any(_gone(pid) for pid in pids)
    t0 = time.monotonic()
    sup.shutdown(grace=0.2)
    assert time.monotonic() - t0 < bound(8)
    assert all(_gone(pid) for pid in pids)
    assert stubborn.process.exitcode == -signal.SIGKILL  # SIGTERM ignored: escalated
    assert sup.wait_for_failure(timeout=0) is None  # a requested shutdown is no failure
    sup.shutdown()  # idempotent


_PARENT = textwrap.dedent(
    """
    import os, signal, sys, time
    from afd.scheduler.cluster.supervisor import Supervisor
    sup = Supervisor()
    w = sup.spawn("expert", 0, time.sleep, 60)
    while w.last_heartbeat is None:  # the child runs its entry (and watches its parent)
        time.sleep(0.02)
    print(w.process.pid, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "term", "int"])
def test_children_die_with_parent(how, bound):
    """Parent SIGKILLed (children notice) or SIGTERM/SIGINT (parent's handlers shut down)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, how], stdout=subprocess.PIPE, text=True
    )
    try:
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        if how != "kill":  # the parent's handlers were installed before it printed
            parent.send_signal(signal.SIGTERM if how == "term" else signal.SIGINT)
        code = parent.wait(timeout=15)
        assert _wait_gone(child_pid, timeout=bound(5)), f"worker {child_pid} outlived its parent"
        if how == "term":
            assert code == -signal.SIGTERM
        elif how == "kill":
            assert code == -signal.SIGKILL
        else:
            assert code != 0  # KeyboardInterrupt
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@pytest.mark.slow
def test_dead_and_hung_workers_are_replaced_until_the_budget_is_spent():
    sup = Supervisor(handle_signals=False, restart_policy=RestartPolicy(2, 60.0),
                     worker_timeout_s=2.0)  # fmt: skip
    try:
        first = sup.spawn("expert", 3, time.sleep, 60)
        sup.enable_restarts()
        assert _wait_for(lambda: first.last_heartbeat is not None, 30)
        os.kill(first.process.pid, signal.SIGKILL)  # dead: replaced, same role and rank
        assert _wait_for(lambda: sup.workers[0] is not first, 10)
        second = sup.workers[0]
        assert (second.role, second.rank) == ("expert", 3) and second.process.is_alive()
        sup.check()  # being replaced is not gone
        assert _wait_for(lambda: second.last_heartbeat is not None, 30)
        os.kill(second.process.pid, signal.SIGSTOP)  # hung: no heartbeat -> killed, replaced
        assert _wait_for(lambda: sup.workers[0] is not second, 15)
        assert "hung: no heartbeat" in sup.restarts[-1].failure.error
        third = sup.workers[0]
        assert _wait_for(lambda: third.last_heartbeat is not None, 30)
        os.kill(third.process.pid, signal.SIGKILL)  # a third failure within the window: fatal
        assert _wait_for(lambda: sup.fatal is not None, 10)
        assert len(sup.restarts) == 2 and sup.workers[0] is third
        with pytest.raises(WorkerDiedError, match="expert worker 3"):
            sup.check()
    finally:
        sup.shutdown(grace=0.0)
    assert all(_gone(w.process.pid) for w in sup.workers + sup.retired)


@pytest.mark.slow
def test_a_main_thread_without_progress_is_killed_as_hung():
    failures = []
    sup = Supervisor(on_failure=failures.append, handle_signals=False, worker_timeout_s=1.5)
    try:
        w = sup.spawn("attention", 0, _stuck_main_thread)
        assert _wait_for(lambda: bool(failures), 30)
        assert failures[0].exitcode == -signal.SIGKILL
        assert "hung: no progress" in failures[0].error and w.last_heartbeat is not None
    finally:
        sup.shutdown(grace=0.0)


def test_only_live_messages_are_failures():
    """A failed step counts only from this generation's data plane and the worker's live
    incarnation; a worker error counts from any generation of a live incarnation."""
    import msgspec

    from afd.comm.messages import Error, StepFailed
    from afd.scheduler.cluster.executor import ClusterLayout
    from afd.scheduler.cluster.recovery import ClusterRecovery
    from afd.scheduler.core.step import RecoveryStats

    # what failure_in reads: the roster and the generation (no supervisor, no sockets)
    driver = ClusterRecovery(None, None, ClusterLayout(1, 0, 0), RecoveryStats())
    driver.incarnations, driver.generation = {0: 7}, 3
    failed = StepFailed(rank=0, inc=7, gen=3, step=5, message="boom")
    failure = driver.failure_in(failed)
    assert failure is not None and failure.rank == 0 and "boom" in str(failure)
    replace = msgspec.structs.replace
    assert driver.failure_in(replace(failed, gen=2)) is None  # its step was abandoned with gen 2
    assert driver.failure_in(replace(failed, inc=6)) is None  # from a replaced process
    error = Error(rank=0, inc=7, gen=2, role="attention", message="lost")
    assert driver.failure_in(error) is not None


def test_a_silent_worker_of_another_node_makes_its_node_lost():
    """Node 0 declares node 1 lost once a rank it awaits there has been silent past the node
    timeout (counted from the later of the wait's start and its last message); node 0's own
    workers are its supervisor's business, not this check's."""
    from afd.scheduler.cluster.executor import ClusterLayout
    from afd.scheduler.cluster.recovery import ClusterRecovery, NodeLostError
    from afd.scheduler.core.step import RecoveryStats

    layout = ClusterLayout(1, 1, 0, nnodes=2, node_roles={0: ["attention"], 1: ["expert"]})
    stats = RecoveryStats()
    driver = ClusterRecovery(None, None, layout, stats, node_timeout_s=3.0)
    long_ago = time.monotonic() - 10
    driver.check_nodes({0}, long_ago)  # rank 0 lives on node 0
    driver.last_heard[1] = time.monotonic()
    driver.check_nodes({1}, long_ago)  # heard from recently
    driver.check_nodes({1}, time.monotonic())
    driver.last_heard[1] = long_ago
    with pytest.raises(NodeLostError, match="node 1 lost: its expert worker 1 sent nothing"):
        driver.check_nodes({0, 1}, long_ago)
    assert stats.nodes_lost == {"1": 1}
    single = ClusterRecovery(None, None, ClusterLayout(1, 1, 0), RecoveryStats())
    single.check_nodes({1}, long_ago)  # one node: nothing to declare lost


class _Inbox:
    """The driver channel as ClusterRecovery uses it: queued worker records in, sends kept."""

    def __init__(self):
        self.queued: list[bytes] = []
        self.sent: list[tuple[int, object]] = []

    def put(self, msg) -> None:
        from afd.comm import wire

        self.queued.append(wire.encode(msg))

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.queued)

    def recv(self) -> bytes:
        return self.queued.pop(0)

    def send_nowait(self, rank: int, msg) -> None:
        self.sent.append((rank, msg))


class _NoFailures:
    failures: list = []

    def check(self) -> None:
        pass


def test_a_lost_node_is_awaited_and_taken_back_when_its_ranks_are_heard_again():
    """After node 1 is declared lost, node 0's workers abandon their step, health names the
    wait (not fatal), and the node is back once each of its ranks said ready (a new process,
    adopted) or spoke again."""
    from afd.comm.messages import Abort, Aborted, Ready
    from afd.scheduler.cluster.executor import ClusterLayout
    from afd.scheduler.cluster.recovery import ClusterRecovery, NodeLostError
    from afd.scheduler.core.step import RecoveryStats, waiting_for_node

    layout = ClusterLayout(1, 2, 0, nnodes=2, node_roles={0: ["attention", "expert"],
                                                          1: ["expert"]})  # fmt: skip
    inbox = _Inbox()
    driver = ClusterRecovery(_NoFailures(), inbox, layout, RecoveryStats(), node_timeout_s=3.0)
    driver.incarnations, driver.generation = {0: 1, 1: 2, 2: 3}, 0
    assert [layout.node_of(r) for r in range(3)] == [0, 0, 1]
    inbox.put(Aborted(rank=0, inc=1, gen=1))
    inbox.put(Aborted(rank=1, inc=2, gen=1))
    driver.lose(NodeLostError("node 1 lost: its expert worker 2 sent nothing", 1))
    assert {r for r, m in inbox.sent if isinstance(m, Abort) and m.gen == 1} == {0, 1, 2}
    why = driver.health()
    assert why.startswith("waiting for node 1 to rejoin") and waiting_for_node(why)
    assert not waiting_for_node("expert worker 2 was killed by SIGKILL")
    assert not driver.rejoined()
    inbox.put(Aborted(rank=0, inc=1, gen=1))  # node 0's own ranks say nothing of node 1
    assert not driver.rejoined()
    inbox.put(Ready(rank=2, inc=9, gen=-1, role="expert", param_bytes=10, pid=4242))
    assert driver.rejoined() and driver.incarnations[2] == 9 and driver.pids[2] == 4242

"""Failures of a cluster, seen from the driver: the restart policy of each node's supervisor,
and the re-formation of the data plane after a worker died, hung or failed a step (see
docs/structures.md, "Failures"). `AFDExecutor` holds a `ClusterRecovery`, which keeps the roster
of live worker incarnations and the data-plane generation."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from afd.comm import wire
from afd.comm.control import generation_dir, remove_generation_dirs
from afd.comm.messages import (
    Abort,
    Aborted,
    Error,
    FromWorker,
    Joined,
    Ready,
    Reform,
    ReformFailed,
    StepFailed,
)
from afd.scheduler.cluster.supervisor import RestartPolicy, Supervisor
from afd.scheduler.core.step import WAITING_FOR_NODE, RecoveryStats

if TYPE_CHECKING:
    from afd.scheduler.cluster.executor import ClusterLayout, DriverChannel

STARTUP_TIMEOUT_S = 300.0  # loading weights; also how long a replacement may take to start
REFORM_TIMEOUT_S = 60.0  # torch.distributed rendezvous of a generation (every rank is loaded)


def node_supervisor(config) -> Supervisor:
    """The supervisor of one node's workers, with the cluster's restart policy and hang
    timeout (restarts start once enable_restarts() is called)."""
    policy = config.failure  # checked by FailurePolicy itself
    return Supervisor(
        restart_policy=RestartPolicy(policy.max_worker_restarts, policy.restart_window_s),
        worker_timeout_s=policy.worker_timeout_s,
    )


class _Failure(Exception):
    """Something failed in the data plane or a worker; the cluster must be re-formed. `rank`:
    the worker whose plan raised, when that is what failed."""

    def __init__(self, reason: str, rank: int | None = None):
        super().__init__(reason)
        self.rank = rank


class NodeLostError(RuntimeError):
    """A node's workers left the driver waiting past --node-timeout-s: the node is lost, and
    with a fixed shard layout the survivors cannot hold its part of the model; the cluster
    waits for it to rejoin (`ClusterRecovery.lose`)."""

    def __init__(self, reason: str, node: int):
        super().__init__(reason)
        self.node = node


@dataclass
class LostNodes:
    """The nodes declared lost: their ranks, why, and when (a rank heard from after that is
    back)."""

    nodes: list[int]
    ranks: set[int]
    reason: str
    since: float

    @property
    def name(self) -> str:
        many = len(self.nodes) > 1
        return f"node{'s' if many else ''} {', '.join(map(str, self.nodes))}"


class ClusterRecovery:
    """Notices failures (supervisor deaths, replacements saying ready, failed steps) and
    re-forms the data plane as a new generation; keeps which process of each rank is live."""

    def __init__(
        self,
        supervisor: Supervisor,
        channel: DriverChannel,
        layout: ClusterLayout,
        stats: RecoveryStats,
        progress: bool = False,
        node_timeout_s: float | None = None,
    ):
        self.supervisor, self.channel, self.layout, self.stats = supervisor, channel, layout, stats
        self.progress = progress  # print each worker's start-up
        # workers on other nodes have no local supervisor here: silence while awaited is all
        # node 0 sees of a lost node (None: single node)
        self.node_timeout_s = node_timeout_s
        self.last_heard: dict[int, float] = {}  # rank -> when its last message arrived
        self.ranks = list(range(layout.world_size))
        self.generation = -1  # of the data plane; -1 until the cluster first formed
        self.incarnations: dict[int, int] = {}  # rank -> incarnation of its current process
        self.pids: dict[int, int] = {}  # rank -> pid of its current process (any node)
        self.param_bytes: dict[tuple[str, int], int] = {}  # (role, rank) -> bytes of weights
        self.recovering: str | None = None  # what is being recovered (for /health)
        self.lost: LostNodes | None = None  # nodes the cluster waits for (503 meanwhile)
        self._replaced: set[int] = set()  # ranks seen with a new incarnation, not yet handled
        self._failures_seen = 0

    def role(self, rank: int) -> str:
        return self.layout.role(rank)

    def adopt(self, msg: Ready) -> None:
        """A (new) process of a rank said ready: its incarnation is the one to listen to."""
        rank = msg.rank
        if self.incarnations.get(rank) is not None:
            self._replaced.add(rank)
        self.incarnations[rank] = msg.inc
        self.pids[rank] = msg.pid
        self.param_bytes[(msg.role, rank)] = msg.param_bytes
        if self.progress and self.generation < 0:
            print(f"afd: {msg.role} worker {rank} ready (pid {msg.pid}, "
                  f"{msg.param_bytes / 2**20:.1f} MiB of weights; "
                  f"{len(self.incarnations)}/{self.layout.world_size})", flush=True)  # fmt: skip

    def current(self, msg: FromWorker) -> bool:
        """From the worker's live incarnation and, for a failed step, from this generation's
        data plane (a step of an abandoned generation was dealt with when it was abandoned)."""
        if isinstance(msg, StepFailed) and msg.gen != self.generation:
            return False
        return msg.inc == self.incarnations.get(msg.rank)

    def failure_in(self, msg: FromWorker) -> _Failure | None:
        """The failure this message tells of (the data plane must be re-formed), if any."""
        if isinstance(msg, Ready) and not self.current(msg):
            self.adopt(msg)
            return _Failure(f"{msg.role} worker {msg.rank} was replaced (pid {msg.pid})")
        if isinstance(msg, Error | StepFailed) and self.current(msg):
            name = f"{self.role(msg.rank)} worker {msg.rank}"
            rank = msg.rank if isinstance(msg, StepFailed) else None
            return _Failure(f"{name} failed: {msg.message}", rank)
        return None

    def receive(self) -> FromWorker | None:
        """The worker message waiting in the inbox; None (and a log line) if it is malformed."""
        raw = self.channel.recv()  # None: dropped and logged by the channel (comm/auth)
        if raw is None:
            return None
        try:
            msg = wire.decode_from_worker(raw)
        except wire.WireError as e:
            log(f"dropped a worker message: {e}")
            return None
        self.last_heard[msg.rank] = time.monotonic()
        return msg

    def check_nodes(self, awaiting: set[int], since: float) -> None:
        """Raise NodeLostError when a rank on a node > 0 that the driver has awaited since
        `since` has sent nothing for --node-timeout-s."""
        if self.node_timeout_s is None:
            return
        now = time.monotonic()
        for rank in sorted(awaiting):
            node = self.layout.node_of(rank)
            silent = now - max(since, self.last_heard.get(rank, since))
            if node != 0 and silent > self.node_timeout_s:
                self.stats.nodes_lost[str(node)] = self.stats.nodes_lost.get(str(node), 0) + 1
                raise NodeLostError(
                    f"node {node} lost: its {self.role(rank)} worker {rank} sent nothing for "
                    f"{silent:.1f} s (--node-timeout-s {self.node_timeout_s:g})",
                    node,
                )

    def next(self, deadline: float, what: str) -> FromWorker | None:
        """The next worker message, or None after 0.1 s; raises WorkerDiedError when a worker
        is gone for good (restart budget spent) and TimeoutError past the deadline."""
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the workers in time during {what}")
        if self.channel.poll(100):
            return self.receive()
        self.supervisor.check()
        return None

    def check_failures(self) -> None:
        """Raise _Failure for a worker death the supervisor recorded since the last recovery."""
        self.supervisor.check()
        failures = self.supervisor.failures
        if len(failures) > self._failures_seen:
            raise _Failure(failures[self._failures_seen].describe())

    def form(self, gen: int, deadline: float) -> bool:
        """Every rank joins data-plane generation `gen` (the same path at start-up and after a
        failure). False when a worker failed meanwhile (the caller starts a new generation)."""
        folder = generation_dir(self.layout.shm, gen)
        if folder:
            os.makedirs(folder, exist_ok=True)
        for rank in self.ranks:
            self.channel.send(rank, Reform(gen=gen))
        pending, since = set(self.ranks), time.monotonic()
        while pending:
            msg = self.next(deadline, f"forming generation {gen}")
            self.check_nodes(pending, since)
            if len(self.supervisor.failures) > self._failures_seen:
                return False
            if msg is None:
                continue
            if isinstance(msg, Ready) and not self.current(msg):
                self.adopt(msg)
                return False
            if not self.current(msg):
                continue
            if isinstance(msg, Joined) and msg.gen == gen:
                pending.discard(msg.rank)
            elif isinstance(msg, Error | StepFailed | ReformFailed):
                log(f"{self.role(msg.rank)} worker {msg.rank}: {msg.message}")
                return False
        return True

    def start(self) -> None:
        """Start-up: wait until every rank said ready, then form generation 0."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while len(self.incarnations) < self.layout.world_size:
            msg = self.next(deadline, "worker start-up")
            if isinstance(msg, Error):
                raise RuntimeError(f"{msg.role} worker {msg.rank} failed: {msg.message}")
            if isinstance(msg, Ready):
                self.adopt(msg)
        self.generation = 0
        if not self.form(0, time.monotonic() + STARTUP_TIMEOUT_S):
            raise RuntimeError("a worker failed while the cluster formed")
        self._replaced.clear()
        self.supervisor.enable_restarts()

    def recover(self, reason: str) -> set[int]:
        """Re-form the data plane after a failure; returns the ranks whose process was replaced
        (their state is gone). Raises (fatal) when the restart budget is spent or a replacement
        does not come up within STARTUP_TIMEOUT_S."""
        t0 = time.monotonic()
        self.recovering = reason
        log(f"worker failure: {reason}; recovering")
        deadline = t0 + STARTUP_TIMEOUT_S
        while True:
            self.generation += 1
            gen = self.generation
            self._abort_generation(gen, deadline)
            if self.form(gen, deadline):
                break
            log(f"another failure while re-forming generation {gen}; again")
        remove_generation_dirs(self.layout.shm, keep=gen)
        replaced, self._replaced = self._replaced, set()
        for rank in replaced:
            role = self.role(rank)
            self.stats.restarts[role] = self.stats.restarts.get(role, 0) + 1
        took = time.monotonic() - t0
        self.stats.seconds.append(took)
        names = ", ".join(
            f"{self.role(r)} worker {r} (now pid {self.pids.get(r)})" for r in sorted(replaced)
        )
        log(f"recovered in {took:.2f} s: data-plane generation {gen}; "
            f"replaced: {names or 'none'}")  # fmt: skip
        self.recovering = None
        if self.lost is not None:
            log(f"{self.lost.name} rejoined: serving again")
            self.lost = None
        return replaced

    def lose(self, e: NodeLostError) -> None:
        """Node e.node is lost: the living workers abandon their step (and data plane), and the
        cluster waits for the node to come back (`rejoined`); until then it cannot serve."""
        ranks = {r for r in self.ranks if self.layout.node_of(r) == e.node}
        before = self.lost
        if before is not None:  # lost while another was awaited (or re-forming with it)
            ranks |= before.ranks
        nodes = sorted({self.layout.node_of(r) for r in ranks})
        self.lost = LostNodes(nodes, ranks, str(e), time.monotonic())
        self.recovering = None
        log(f"{e}; not serving (HTTP 503) until node {e.node} is started again with "
            f"--node-rank {e.node}")  # fmt: skip
        self.generation += 1
        living = [r for r in self.ranks if r not in ranks]
        self._abort_generation(self.generation, time.monotonic() + REFORM_TIMEOUT_S, living)

    def rejoined(self) -> bool:
        """While a node is lost: read what the workers sent (a new process of a rank is adopted);
        True once every rank of the lost node was heard from since it was lost."""
        lost = self.lost
        assert lost is not None
        self.supervisor.check()  # a worker of this node gone for good is fatal even now
        while self.channel.poll(0):
            msg = self.receive()
            if isinstance(msg, Ready) and not self.current(msg):
                self.adopt(msg)
                if msg.rank in lost.ranks:
                    node = self.layout.node_of(msg.rank)
                    log(f"node {node}: {msg.role} worker {msg.rank} is back (pid {msg.pid})")
        return all(self.last_heard.get(r, lost.since) > lost.since for r in lost.ranks)

    def health(self) -> str | None:
        """Why the cluster cannot serve now but may again (a lost node), else None."""
        lost = self.lost
        if lost is None:
            return None
        return f"{WAITING_FOR_NODE}{lost.name.removeprefix('node')} to rejoin ({lost.reason})"

    def _abort_generation(self, gen: int, deadline: float, ranks: list[int] | None = None) -> None:
        """Every living worker abandons its step; replacements say ready. `ranks`: those to
        wait for (default every rank)."""
        self._failures_seen = len(self.supervisor.failures)
        pending, since = set(self.ranks if ranks is None else ranks), time.monotonic()
        for rank in self.ranks:
            self.channel.send_nowait(rank, Abort(gen=gen))
        while pending:
            msg = self.next(deadline, "recovery")
            self.check_nodes(pending, since)
            if msg is None:
                continue
            if isinstance(msg, Ready) and not self.current(msg):
                self.adopt(msg)  # a replacement, idle and without a data plane
                pending.discard(msg.rank)
            elif isinstance(msg, Aborted) and self.current(msg) and msg.gen == gen:
                pending.discard(msg.rank)


def log(text: str) -> None:
    print(f"afd: {text}", file=sys.stderr, flush=True)

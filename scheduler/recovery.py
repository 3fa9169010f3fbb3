"""Failures of a cluster, seen from the driver: the restart policy of each node's supervisor,
and the re-formation of the data plane after a worker died, hung or failed a step (see
docs/structures.md, "Failures"). `ClusterRecovery` is mixed into `AFDExecutor`, whose messaging
(`_send`, `_send_nowait`, `_next`, `_adopt`) and state it uses."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

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
from afd.engine.executor import StepInterrupted
from afd.scheduler.supervisor import RestartPolicy, Supervisor, WorkerDiedError

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


@dataclass
class RecoveryStats:
    """What the cluster went through: replacements per role and how long each recovery took."""

    restarts: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)


class ClusterRecovery:
    """Notices failures (supervisor deaths, replacements saying ready, failed steps), re-forms
    the data plane as a new generation, and tells the engine what to fix up."""

    def _current(self, msg: FromWorker) -> bool:
        """From the worker's live incarnation and, for a failed step, from this generation's
        data plane (a step of an abandoned generation was dealt with when it was abandoned)."""
        if isinstance(msg, StepFailed) and msg.gen != self.generation:
            return False
        return msg.inc == self._inc.get(msg.rank)

    def _failure_in(self, msg: FromWorker) -> _Failure | None:
        """The failure this message tells of (the data plane must be re-formed), if any."""
        if isinstance(msg, Ready) and not self._current(msg):
            self._adopt(msg)
            return _Failure(f"{msg.role} worker {msg.rank} was replaced (pid {msg.pid})")
        if isinstance(msg, Error | StepFailed) and self._current(msg):
            name = f"{self.role(msg.rank)} worker {msg.rank}"
            rank = msg.rank if isinstance(msg, StepFailed) else None
            return _Failure(f"{name} failed: {msg.message}", rank)
        return None

    def _receive(self) -> FromWorker | None:
        """The worker message waiting in the inbox; None (and a log line) if it is malformed."""
        try:
            return wire.decode_from_worker(self.inbox.recv())
        except wire.WireError as e:
            self._log(f"dropped a worker message: {e}")
            return None

    def _check_failures(self) -> None:
        """Raise _Failure for a worker death the supervisor recorded since the last recovery."""
        self.supervisor.check()
        failures = self.supervisor.failures
        if len(failures) > self._failures_seen:
            raise _Failure(failures[self._failures_seen].describe())

    # ---- failures and recovery -----------------------------------------------------------
    def _log(self, text: str) -> None:
        print(f"afd: {text}", file=sys.stderr, flush=True)

    def _form(self, gen: int, deadline: float) -> bool:
        """Every rank joins data-plane generation `gen` (the same path at start-up and after a
        failure). False when a worker failed meanwhile (the caller starts a new generation)."""
        folder = generation_dir(self.layout.shm, gen)
        if folder:
            os.makedirs(folder, exist_ok=True)
        for rank in self.ranks:
            self._send(rank, Reform(gen=gen))
        pending = set(self.ranks)
        while pending:
            msg = self._next(deadline, f"forming generation {gen}")
            if len(self.supervisor.failures) > self._failures_seen:
                return False
            if msg is None:
                continue
            if isinstance(msg, Ready) and not self._current(msg):
                self._adopt(msg)
                return False
            if not self._current(msg):
                continue
            if isinstance(msg, Joined) and msg.gen == gen:
                pending.discard(msg.rank)
            elif isinstance(msg, Error | StepFailed | ReformFailed):
                self._log(f"{self.role(msg.rank)} worker {msg.rank}: {msg.message}")
                return False
        return True

    def _recover(self, reason: str) -> set[int]:
        """Re-form the data plane after a failure; returns the ranks whose process was replaced
        (their state is gone). Raises (fatal) when the restart budget is spent or a replacement
        does not come up within STARTUP_TIMEOUT_S."""
        t0 = time.monotonic()
        self.recovering = reason
        self._log(f"worker failure: {reason}; recovering")
        deadline = t0 + STARTUP_TIMEOUT_S
        while True:
            self.generation += 1
            gen = self.generation
            self._failures_seen = len(self.supervisor.failures)
            pending = set(self.ranks)
            for rank in self.ranks:
                self._send_nowait(rank, Abort(gen=gen))
            while pending:
                msg = self._next(deadline, "recovery")
                if msg is None:
                    continue
                if isinstance(msg, Ready) and not self._current(msg):
                    self._adopt(msg)  # a replacement, idle and without a data plane
                    pending.discard(msg.rank)
                elif isinstance(msg, Aborted) and self._current(msg) and msg.gen == gen:
                    pending.discard(msg.rank)
            if self._form(gen, deadline):
                break
            self._log(f"another failure while re-forming generation {gen}; again")
        remove_generation_dirs(self.layout.shm, keep=gen)
        replaced, self._replaced = self._replaced, set()
        for rank in replaced:
            role = self.role(rank)
            self.recovery.restarts[role] = self.recovery.restarts.get(role, 0) + 1
        took = time.monotonic() - t0
        self.recovery.seconds.append(took)
        names = ", ".join(
            f"{self.role(r)} worker {r} (now pid {self.pids.get(r)})" for r in sorted(replaced)
        )
        self._log(f"recovered in {took:.2f} s: data-plane generation {gen}; "
                  f"replaced: {names or 'none'}")  # fmt: skip
        self.recovering = None
        return replaced

    def _interrupted(self, failure: _Failure) -> StepInterrupted:
        """Recover, forget the interrupted attempt, and say what the engine must fix up."""
        reason = str(failure)
        for p in self._attempt_prefill:  # the engine sends these again with the replay
            self._prefill_busy.discard(p)
            self._prefill_done.pop(p, None)
        self._attempt_prefill = set()
        replaced = self._recover(reason)
        lost_attention = {r for r in replaced if r in self.attention_ranks}
        lost_prefill = {self.prefill_ranks.index(r) for r in replaced if r in self.prefill_ranks}
        for p in lost_prefill:  # its batch and KV are gone: the engine requeues them
            self._prefill_busy.discard(p)
            self._prefill_done.pop(p, None)
        # living prefill workers abandoned the batch of an earlier step: the engine sends it
        # again with the replay (as a plan of this step, so that it can also bisect it)
        dropped_prefill, self._prefill_busy = self._prefill_busy, set()
        for r in lost_attention:
            self._released.pop(r, None)
        # the replay sends every sampler history again: a replacement has none, and a living
        # worker may have abandoned the step before it kept one
        self._has_history.clear()
        raised = failure.rank
        failed_prefill = (
            {self.prefill_ranks.index(raised)}
            if raised in self.prefill_ranks and raised not in replaced
            else set()
        )
        lost_expert = {r for r in replaced if r in self.expert_ranks}
        return StepInterrupted(
            reason, lost_attention, lost_prefill, dropped_prefill, failed_prefill, lost_expert
        )

    def poll_failures(self) -> StepInterrupted | None:
        """Between steps: notice a failure and recover now (so /health and the next request
        see a healed cluster); returns what the engine must fix up, if anything happened."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        try:
            self._drain()
        except _Failure as f:
            return self._guarded(self._interrupted, f)
        except Exception as e:
            self._die(e)
        return None

    def _drain(self) -> None:
        """Read what the workers sent while no step ran: failures raise _Failure; finished
        prefill results are kept; anything else is stale."""
        self._check_failures()
        while self.inbox.poll(0):
            msg = self._receive()
            if msg is None:
                continue
            failure = self._failure_in(msg)
            if failure is not None:
                raise failure
            self._take_prefill_result(msg)

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            self._die(e)

    def _die(self, e: BaseException):
        self.fatal = f"{e}"
        self._log(f"error: the cluster cannot serve any more: {e}")
        self.shutdown()
        raise e if isinstance(e, WorkerDiedError) else WorkerDiedError(str(e)) from e

    def check_alive(self) -> None:
        """Raise WorkerDiedError if the cluster cannot serve (a worker gone for good)."""
        if self.fatal is not None:
            raise WorkerDiedError(self.fatal)
        self.supervisor.check()

    def health(self) -> tuple[bool, str]:
        """(can serve, why not / what is recovering); safe from any thread."""
        if self.fatal is not None:
            return False, self.fatal
        if self.supervisor.fatal is not None:
            return False, self.supervisor.fatal.describe()
        if self.recovering is not None:
            return True, f"recovering: {self.recovering}"
        return True, "ok"

"""Runs a step plan on an executor until it succeeds: replays it after the executor healed a
failure, and bisects a step that keeps raising to find the request(s) that make it raise. What
happened comes back as data in the StepResult (requests failed, replicas reset)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from afd.engine.engine_scheduler import EngineScheduler
from afd.scheduler.core.scheduler import ScheduledBatch
from afd.scheduler.core.step import (
    ClusterUnavailable,
    Executor,
    StepInterrupted,
    StepPlan,
    StepResult,
)

logger = logging.getLogger("afd.engine")

# a step that fails this many times in a row with no worker replaced (a fault the requests
# themselves trigger, not the cluster) is bisected to find the request(s) that make it fail
MAX_FAILED_REPLAYS = 2
# while bisecting: raises allowed per halving level (one culprit costs one per level); past
# them the step fails for everyone (a real bug), and its remaining requests fail at once
ISOLATION_FAILURES_PER_LEVEL = 2


@dataclass
class _Attempts:
    """What the tries of one step gathered besides their tokens."""

    sample_errors: dict[int, str] = field(default_factory=dict)
    prompt_logprobs: dict[int, list] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    reset_replicas: set[int] = field(default_factory=set)
    reset_prefill: set[int] = field(default_factory=set)


class StepRunner:
    """Wraps the executor: replay after recovery, poison-request bisection."""

    def __init__(self, executor: Executor, scheduler: EngineScheduler):
        self.executor, self.scheduler = executor, scheduler
        self._prefill_raises: dict[int, int] = {}  # prefill replica -> raises of its plan
        self._tries = _Attempts()

    def execute(self, plan: StepPlan) -> StepResult:
        """Run the step; when a worker failed and the cluster healed, fix up what its failure
        lost and run the step again (the same batches: a replay writes the same KV slots). A
        step that keeps raising with no worker lost is bisected (`_isolate`)."""
        self._tries = tries = _Attempts()
        try:
            steps, done = self._execute(plan)
        except ClusterUnavailable as e:  # a node is lost: every request ends now, not later
            self._fail(dict.fromkeys(self.scheduler.replica_of, str(e)), plan)
            steps, done = [{}], []
        for p in done:
            self._prefill_raises.pop(p, None)
        return StepResult(steps, done, tries.sample_errors, tries.prompt_logprobs, tries.failed,
                          tries.reset_replicas, tries.reset_prefill)  # fmt: skip

    def maintain(self) -> None:
        """While idle: let the executor notice and heal a failure now, so the next request (and
        /health) finds the cluster whole; replicas whose KV died start empty."""
        e = self.executor.poll_failures()
        if e is not None:
            self._recovered(e, self.scheduler.empty_plan())

    def _execute(self, plan: StepPlan) -> tuple[list, list[int]]:
        failed_replays = 0
        while True:
            try:
                result = self._run(plan)
                return result.steps, result.finished_prefill
            except StepInterrupted as e:
                self._recovered(e, plan)
                failed_replays = 0 if e.lost_worker else failed_replays + 1
                # a prefill plan may raise while a later step runs, and that step's replay may
                # end before it raises again: its raises are counted until it finishes
                for p in e.failed_prefill:
                    self._prefill_raises[p] = self._prefill_raises.get(p, 0) + 1
                if max(failed_replays, *self._prefill_raises.values(), 0) < MAX_FAILED_REPLAYS:
                    continue
                result = self._isolate(e.reason, plan)
                if result is not None:
                    return result
                failed_replays = 0  # a worker was lost meanwhile: the rest is replayed whole

    def _run(self, plan: StepPlan) -> StepResult:
        """One execute; what it reports besides its tokens is kept for the step's result."""
        result = self.executor.execute(plan)
        self._tries.sample_errors.update(result.sample_errors)
        for seq_id, chunks in result.prompt_logprobs.items():
            self._tries.prompt_logprobs.setdefault(seq_id, []).extend(chunks)
        return result

    def _isolate(self, reason: str, plan: StepPlan) -> tuple[list, list[int]] | None:
        """The step raised MAX_FAILED_REPLAYS times with no worker lost: find the request(s)
        that make it raise by running parts of it (decode work and each prefill replica's
        batch apart, then halves of a part that raises, until the request is alone), fail
        those and keep what the other parts computed. Each replay is idempotent (the same KV
        slots; sampling is a function of request state). At most ISOLATION_FAILURES_PER_LEVEL
        raises per halving level: a step that raises for everyone fails every request left,
        in bounded time. None when a worker was lost meanwhile (the caller replays the rest)."""
        groups, culprits = _first_groups(plan, reason)
        total = sum(len(g) for g in groups) or len(culprits)
        budget = ISOLATION_FAILURES_PER_LEVEL * (max(total - 1, 1).bit_length() + 1)
        failures, steps, done = 0, [{}], set()
        logger.warning("step failed %d times with no worker lost (%s); isolating the "
                       "request(s) that make it fail among %d", MAX_FAILED_REPLAYS, reason,
                       total)  # fmt: skip
        while groups:
            group = groups.pop(0)
            if failures >= budget:  # not one request's fault: the rest fails as a whole
                culprits.update(dict.fromkeys(group, reason))
                continue
            try:
                got = self._run(_part(plan, set(group)))
            except StepInterrupted as e:
                if e.lost_worker or e.dropped_prefill:
                    self._fail(culprits, plan)
                    self._recovered(e, plan)
                    return None
                failures, reason = failures + 1, e.reason
                if len(group) == 1:
                    culprits[group[0]] = e.reason
                else:
                    groups[:0] = _halves(group)
                continue
            for k, sampled in enumerate(got.steps):
                if k == len(steps):
                    steps.append({})
                steps[k].update(sampled)
            done.update(got.finished_prefill)
        self._fail(culprits, plan)
        self._prefill_raises.clear()  # every prefill batch ran or failed
        self.scheduler.router.drop_failed(plan, done)
        return steps, sorted(done)

    def _recovered(self, e: StepInterrupted, plan: StepPlan) -> None:
        self.scheduler.recover(e, plan)
        for p in e.lost_prefill:
            self._prefill_raises.pop(p, None)
        self._tries.reset_replicas |= e.lost_attention
        self._tries.reset_prefill |= e.lost_prefill

    def _fail(self, culprits: dict[str, str], plan: StepPlan) -> None:
        """Requests that make the step raise leave it (and the schedulers); the engine finishes
        them with an error."""
        for replica, seq_ids in self.scheduler.fail(set(culprits), plan):
            self.executor.release(replica, seq_ids)
        self._tries.failed.update(culprits)


def _first_groups(plan: StepPlan, reason: str) -> tuple[list[list[str]], dict[str, str]]:
    """The parts a bisection starts from: the decode work, then each prefill replica's batch;
    a step of one part is halved at once (the whole step already raised)."""
    decode = list(
        dict.fromkeys(
            [s.request_id for b in plan.batches for s in b.seqs]
            + [t.seq.request_id for t in plan.transfers]
        )
    )
    groups = [decode] + [list(dict.fromkeys(s.request_id for s in b.seqs)) for b in plan.prefill]
    groups = [g for g in groups if g]
    culprits: dict[str, str] = {}
    if len(groups) == 1:  # that part is the whole step, which already raised: halve it
        if len(groups[0]) == 1:
            return [], {groups[0][0]: reason}
        return _halves(groups[0]), culprits
    return groups, culprits


def _part(plan: StepPlan, ids: set[str]) -> StepPlan:
    return StepPlan(
        [_only(b, ids) for b in plan.batches],
        [_only(b, ids) for b in plan.prefill],
        [t for t in plan.transfers if t.seq.request_id in ids],
    )


def _halves(ids: list[str]) -> list[list[str]]:
    mid = len(ids) // 2
    return [ids[:mid], ids[mid:]]


def _only(batch: ScheduledBatch, request_ids: set[str]) -> ScheduledBatch:
    """The part of a batch that belongs to these requests (the same decode steps)."""
    part = ScheduledBatch(num_steps=batch.num_steps)
    for seq, n, sample in zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True):
        if seq.request_id in request_ids:
            part.seqs.append(seq), part.num_new_tokens.append(n), part.sample.append(sample)
    return part

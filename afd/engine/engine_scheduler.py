"""The engine's scheduler: one Scheduler per attention replica (and per prefill replica, with
the prefill router between them), which replica runs a request, and the `StepPlan` of every
step."""

from __future__ import annotations

import dataclasses
import logging

from afd.engine.prefill_router import PrefillRouter
from afd.scheduler.core.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from afd.scheduler.core.sequence import Sequence
from afd.scheduler.core.step import StepInterrupted, StepPlan

logger = logging.getLogger("afd.engine")


class EngineScheduler:
    """Routes requests to replicas and builds each step's plan from every replica's batch."""

    def __init__(
        self,
        config: SchedulerConfig,
        num_replicas: int,
        num_prefill_replicas: int,
        num_scheduler_steps: int = 1,
    ):
        if config.speculative is not None and num_scheduler_steps > 1:
            # a multi-step plan feeds each step's one token to the next: no room for a draft
            logger.warning("speculative decoding is off with --num-scheduler-steps > 1")
        no_spec = dataclasses.replace(config, speculative=None)  # prefill replicas never decode
        decode = config if num_scheduler_steps <= 1 else no_spec
        self.speculative = decode.speculative is not None
        self.schedulers = [Scheduler(decode) for _ in range(num_replicas)]
        self.prefill_schedulers = [Scheduler(no_spec) for _ in range(num_prefill_replicas)]
        self.router = PrefillRouter(self.schedulers, self.prefill_schedulers, config.block_size)
        self.num_scheduler_steps = num_scheduler_steps
        self.replica_of: dict[str, tuple[int, int | None]] = {}  # (decode, prefill)
        self._seq_ids: dict[str, list[int]] = {}
        self.requests_recomputed = 0  # requests whose KV died with a worker and was recomputed

    # ---- requests -------------------------------------------------------------------------
    def add(self, request_id: str, seqs: list[Sequence]) -> None:
        """Queue a request's sequences on the replica that suits its prompt best."""
        replica = pick_replica(self.schedulers, seqs[0])
        prefill = (
            pick_replica(self.prefill_schedulers, seqs[0]) if self.prefill_schedulers else None
        )
        target = self.schedulers[replica] if prefill is None else self.prefill_schedulers[prefill]
        for seq in seqs:
            target.add(seq)
        self.replica_of[request_id] = (replica, prefill)
        self._seq_ids[request_id] = [s.seq_id for s in seqs]

    def abort(self, request_id: str) -> tuple[int, list[int]] | None:
        """Stop a request everywhere; (its replica, its sequences) for the executor to release,
        None when unknown."""
        where = self.replica_of.get(request_id)
        if where is None:
            return None
        replica, prefill = where
        self.schedulers[replica].abort_request(request_id)
        if prefill is not None:
            self.router.abort(prefill, request_id)
        return self.forget(request_id)

    def forget(self, request_id: str) -> tuple[int, list[int]] | None:
        """A request leaves the routing table: (its replica, its sequences) or None."""
        where = self.replica_of.pop(request_id, None)
        seq_ids = self._seq_ids.pop(request_id, [])
        return None if where is None else (where[0], seq_ids)

    def has_unfinished(self) -> bool:
        return self.router.busy or any(
            s.has_unfinished for s in self.schedulers + self.prefill_schedulers
        )

    # ---- steps ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """This step's plan: handoffs placed first (their copies run before the replica
        computes), then every replica's batch; None when there is nothing to run or wait for."""
        transfers = self.router.place()
        batches = [s.schedule() for s in self.schedulers]
        plan = StepPlan(batches, self.router.schedule(), transfers)
        if plan.is_empty and not self.router.inflight:
            return None
        self._plan_decode_steps(batches)
        self.router.send(plan.prefill)
        return plan

    def _plan_decode_steps(self, batches: list[ScheduledBatch]) -> None:
        """With num_scheduler_steps > 1, pure-decode batches run several steps per plan; every
        replica runs the same number, since the expert workers see all of them in lockstep."""
        active = [(s, b) for s, b in zip(self.schedulers, batches, strict=True) if not b.is_empty]
        if self.num_scheduler_steps <= 1 or not active:
            return
        k = min(s.max_decode_steps(b, self.num_scheduler_steps) for s, b in active)
        if k > 1:
            for scheduler, batch in active:
                scheduler.reserve_decode_steps(batch, k)

    def empty_plan(self) -> StepPlan:
        return StepPlan(
            [ScheduledBatch() for _ in self.schedulers],
            [ScheduledBatch() for _ in self.prefill_schedulers],
        )

    def recover(self, e: StepInterrupted, plan: StepPlan) -> None:
        """Requests whose KV lived on a replaced attention or prefill worker are recomputed from
        their prompt and the tokens produced so far; abandoned prefill plans of earlier steps
        join this step's; the plan's lists are fixed up in place."""
        recomputed: set[str] = set()
        for r in e.lost_attention:
            recomputed |= {s.request_id for s in self.schedulers[r].reset()}
            plan.batches[r] = ScheduledBatch()
            for t in [t for t in plan.transfers if t.replica == r]:
                plan.transfers.remove(t)  # adopted by replica r, so reset with it
                if t.prefill not in e.lost_prefill:
                    self.router.free(t)
        recomputed |= self.router.recover(e, plan)
        recomputed &= set(self.replica_of)
        self.requests_recomputed += len(recomputed)
        if recomputed:
            logger.warning("recomputing %d request(s) whose KV died: %s", len(recomputed),
                           ", ".join(sorted(recomputed)[:8]))  # fmt: skip

    def fail(self, failed: set[str], plan: StepPlan) -> list[tuple[int, list[int]]]:
        """Requests that make a step raise stop here and leave the plan's batches and transfers;
        returns what the executor may release of them."""
        released = [w for w in (self.abort(rid) for rid in failed) if w is not None]
        for b in [*plan.batches, *plan.prefill]:
            keep = [i for i, s in enumerate(b.seqs) if s.request_id not in failed]
            for lst in (b.seqs, b.num_new_tokens, b.sample):
                lst[:] = [lst[i] for i in keep]
        for t in [t for t in plan.transfers if t.seq.request_id in failed]:
            plan.transfers.remove(t)  # its copy will not run: the source blocks are free again
            self.router.free(t)
        return released

    # ---- gauges ---------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Running/waiting requests and KV usage (mean over replicas), preemptions, prefix hits."""
        n = len(self.schedulers)
        every = self.schedulers + self.prefill_schedulers
        running = sum(s.num_running for s in every) + len(self.router.handoffs)
        return {
            "num_requests_running": float(running),
            "num_requests_waiting": float(sum(s.num_waiting for s in every)),
            "kv_cache_usage_perc": sum(s.block_manager.usage for s in self.schedulers) / n,
            "num_preemptions_total": float(sum(s.num_preemptions for s in every)),
            "prefix_cache_queries_total": float(sum(s.prefix_cache_queries for s in every)),
            "prefix_cache_hits_total": float(sum(s.prefix_cache_hits for s in every)),
            **self.spec_stats(),
        }

    def spec_stats(self) -> dict[str, float]:
        """vLLM's spec-decode counters summed over replicas; {} with speculation off."""
        out: dict[str, float] = {}
        for s in self.schedulers:
            if s.drafter is not None:
                for k, v in s.drafter.counts.stats().items():
                    out[k] = out.get(k, 0.0) + v
        return out


def pick_replica(schedulers: list[Scheduler], seq: Sequence) -> int:
    """The replica that already caches the longest prefix of the prompt, else the least loaded
    by free KV blocks (ties: fewest requests)."""
    if len(schedulers) == 1:
        return 0
    return max(
        range(len(schedulers)),
        key=lambda i: (
            schedulers[i].block_manager.cached_prefix_blocks(seq),
            schedulers[i].block_manager.num_free_blocks,
            -schedulers[i].num_running - schedulers[i].num_waiting,
        ),
    )

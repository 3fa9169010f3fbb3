"""P/D: prompts run on prefill replicas, then their KV moves to an attention replica. The
router owns that way: the plans in flight on prefill workers and the prefilled sequences on
their way to a replica (`Handoff`)."""

from __future__ import annotations

from afd.scheduler.core.scheduler import ScheduledBatch, Scheduler
from afd.scheduler.core.sequence import SequenceStatus
from afd.scheduler.core.step import Handoff, Sampled, StepInterrupted, StepPlan


class PrefillRouter:
    """Prefill plans in flight (a busy worker gets no new plan; decode steps do not wait for
    it) and the handoffs of prefilled sequences to their attention replica."""

    def __init__(self, schedulers: list[Scheduler], prefill: list[Scheduler], block_size: int):
        self.schedulers, self.prefill, self.block_size = schedulers, prefill, block_size
        self.handoffs: list[Handoff] = []
        self.inflight: dict[int, ScheduledBatch] = {}  # prefill replica -> its batch

    @property
    def busy(self) -> bool:
        return bool(self.handoffs or self.inflight)

    def schedule(self) -> list[ScheduledBatch]:
        """A new batch per prefill replica; an empty one for a replica whose plan is in flight."""
        return [
            ScheduledBatch() if p in self.inflight else s.schedule()
            for p, s in enumerate(self.prefill)
        ]

    def send(self, batches: list[ScheduledBatch]) -> None:
        """These batches go to their workers now: in flight until their result comes back."""
        for p, b in enumerate(batches):
            if not b.is_empty:
                self.inflight[p] = b

    def place(self) -> list[Handoff]:
        """Give prefilled sequences KV blocks on their attention replica; the KV copy of each
        runs at the start of this step, before the replica computes."""
        placed = []
        for h in list(self.handoffs):
            if h.prefill in self.inflight:
                continue  # its worker is busy; the copy goes with that worker's next plan
            bm = self.schedulers[h.replica].block_manager
            if not bm.can_allocate(h.seq):
                continue  # stays on the prefill worker until the replica has room
            self.handoffs.remove(h)
            bm.allocate(h.seq)  # may reuse cached prefix blocks: those need no copy
            bs = self.block_size
            h.first_block = h.seq.num_computed_tokens // bs
            h.num_blocks = (h.seq.num_tokens - 1 + bs - 1) // bs
            h.seq.num_computed_tokens = h.seq.num_tokens - 1
            self.schedulers[h.replica].adopt(h.seq)
            placed.append(h)
        return placed

    def free(self, transfer: Handoff) -> None:
        """The source blocks of a copy that ran (or never will) are free again."""
        self.prefill[transfer.prefill].block_manager.free_table(transfer.prefill_table)

    def finished(self, plan: StepPlan, done: list[int]) -> list[ScheduledBatch]:
        """After a step: its copies ran; the batch of every prefill replica whose plan finished
        (empty for the others)."""
        for t in plan.transfers:
            self.free(t)
        return [
            self.inflight.pop(p, ScheduledBatch()) if p in done else ScheduledBatch()
            for p in range(len(self.prefill))
        ]

    def hand_off(self, batches: list[ScheduledBatch], first: Sampled, replica_of) -> None:
        """Prefilled sequences that sampled their first token leave their prefill worker for
        their attention replica (`replica_of(request_id)`)."""
        for p, (scheduler, batch) in enumerate(zip(self.prefill, batches, strict=True)):
            for seq in batch.seqs:
                if seq.seq_id in first and seq.status == SequenceStatus.RUNNING:
                    replica = replica_of(seq.request_id)
                    self.handoffs.append(Handoff(seq, p, replica, scheduler.detach(seq)))

    def abort(self, prefill: int, request_id: str) -> None:
        self.prefill[prefill].abort_request(request_id)
        for h in [h for h in self.handoffs if h.seq.request_id == request_id]:
            self.handoffs.remove(h)
            self.free(h)
            h.seq.status = SequenceStatus.FINISHED_ABORTED

    def drop_failed(self, plan: StepPlan, done: set[int]) -> None:
        """After a bisection: a replica whose plan lost every request to failures has none."""
        for p, b in enumerate(plan.prefill):
            if b.is_empty and p not in done:
                self.inflight.pop(p, None)

    def recover(self, e: StepInterrupted, plan: StepPlan) -> set[str]:
        """Prefill replicas whose worker was replaced start over (their KV and plans are gone);
        abandoned plans of living workers run again with this step. Returns the requests to
        recompute."""
        recomputed: set[str] = set()
        for p in e.lost_prefill:
            scheduler = self.prefill[p]
            recomputed |= {s.request_id for s in scheduler.reset()}
            self.inflight.pop(p, None)
            plan.prefill[p] = ScheduledBatch()
            for h in [h for h in self.handoffs if h.prefill == p]:
                self.handoffs.remove(h)  # its KV died before the copy: prefill it again
                scheduler.requeue(h.seq)
                recomputed.add(h.seq.request_id)
            for t in [t for t in plan.transfers if t.prefill == p]:
                plan.transfers.remove(t)  # the copy cannot happen: recompute on the replica
                self._unplace(t, plan)
                recomputed.add(t.seq.request_id)
        for p in e.dropped_prefill - e.lost_prefill:
            if p in self.inflight:  # its worker abandoned it: it runs with the replay
                plan.prefill[p] = self.inflight[p]
        return recomputed

    def _unplace(self, t: Handoff, plan: StepPlan) -> None:
        replica, batch = self.schedulers[t.replica], plan.batches[t.replica]
        if t.seq in batch.seqs:
            i = batch.seqs.index(t.seq)
            for lst in (batch.seqs, batch.num_new_tokens, batch.sample):
                del lst[i]
        if t.seq in replica.running:
            replica._preempt(t.seq)

"""Continuous batching: FCFS admission, chunked prefill under a token budget, preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afd.scheduler.core.block_manager import BlockManager
from afd.scheduler.core.sequence import Sequence, SequenceStatus
from afd.spec.config import SpeculativeConfig
from afd.spec.drafter import NgramDrafter


@dataclass
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    max_model_len: int = 4096
    speculative: SpeculativeConfig | None = None  # n-gram drafts for decoding sequences


@dataclass
class ScheduledBatch:
    """What one step computes: `num_new_tokens[i]` tokens of `seqs[i]` from its computed prefix.
    A pure-decode batch may run `num_steps` decode steps in a row, each feeding back its token."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)  # the chunk reaches the end: sample a token
    preempted: list[Sequence] = field(default_factory=list)
    num_steps: int = 1

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly its last token and samples the next one."""
        return bool(self.seqs) and all(
            n == 1 and s for n, s in zip(self.num_new_tokens, self.sample, strict=True)
        )

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.sample.append(seq.num_computed_tokens + n == seq.num_tokens)

    def draft_run(self, sampled: dict) -> ScheduledBatch:
        """The drafted sequences that emitted another token in `sampled` (a result step past the
        batch's own): each has computed one more token, its accepted draft, and samples."""
        run = ScheduledBatch()
        for seq in self.seqs:
            if seq.draft and seq.seq_id in sampled:
                run.add(seq, 1)
        return run


class Scheduler:
    """Owns the waiting and running queues of one KV cache (one attention replica)."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        spec = config.speculative
        self.drafter = NgramDrafter(spec) if spec is not None and spec.method == "ngram" else None
        # cumulative, for /metrics
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; a prompt that can never fit raises ValueError."""
        if seq.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens does not fit max_model_len "
                f"{self.config.max_model_len}"
            )
        blocks = (seq.num_tokens + self.config.block_size) // self.config.block_size
        if blocks > self.config.num_blocks:
            raise ValueError(
                f"prompt of {seq.num_tokens} tokens needs {blocks} KV blocks, "
                f"the cache has {self.config.num_blocks}"
            )
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        # Running sequences first: decodes and unfinished chunked prefills, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            bm.append_slots(seq, n)
            batch.add(seq, n)
            budget -= n + len(self._draft(seq, n, budget - n))
            i += 1
        # Then admit waiting sequences while budget, seats and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if batch.preempted and seq in batch.preempted:
                break  # do not readmit in the step that preempted it
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            if self.config.enable_prefix_caching:  # vLLM's counts: prompt tokens looked up, found
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        return batch

    def _draft(self, seq: Sequence, n: int, budget: int) -> list[int]:
        """A decoding sequence's draft, its KV slots taken (none when the blocks are short)."""
        if self.drafter is None or n != 1:
            return []
        room = min(budget, self.config.max_model_len - seq.num_tokens - 1)
        draft = self.drafter.propose(seq, room)
        if draft and self.block_manager.can_append(seq, 1 + len(draft)):
            self.block_manager.append_slots(seq, 1 + len(draft))
            seq.draft = draft
        return seq.draft

    def settle_drafts(self, batch: ScheduledBatch, emitted: dict[int, int]) -> None:
        """After a step's tokens were applied: count each draft's accepted tokens (`emitted`:
        tokens per sequence, the accepted drafts + 1) and give back the KV slots of rejected
        ones; only accepted tokens were marked computed, so only they reach the prefix cache."""
        for seq in batch.seqs:
            if not seq.draft:
                continue
            accepted = max(0, min(emitted.get(seq.seq_id, 0) - 1, len(seq.draft)))
            self.drafter.observe(seq, len(seq.draft), accepted)
            seq.draft = []
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.trim(seq)

    def max_decode_steps(self, batch: ScheduledBatch, limit: int) -> int:
        """How many decode steps in a row (at most `limit`) the batch can run: 1 unless it is
        pure decode; no sequence may pass max_model_len, the KV blocks for every step must be
        free, and no more steps than the longest remaining max_tokens."""
        if limit <= 1 or not batch.is_decode or batch.preempted:
            return 1
        seqs = batch.seqs
        k = min(limit, min(self.config.max_model_len - s.num_tokens for s in seqs))
        remaining = [
            s.sampling_params.max_tokens - s.num_output_tokens
            for s in seqs
            if s.sampling_params.max_tokens is not None
        ]
        if len(remaining) == len(seqs):
            k = min(k, max(remaining))
        bm = self.block_manager
        while k > 1 and sum(bm.blocks_to_append(s, k) for s in seqs) > bm.num_free_blocks:
            k -= 1
        return max(1, k)

    def reserve_decode_steps(self, batch: ScheduledBatch, num_steps: int) -> None:
        """KV slots for `num_steps` decode steps of every sequence (after max_decode_steps)."""
        for seq in batch.seqs:
            self.block_manager.append_slots(seq, num_steps)
        batch.num_steps = num_steps

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its KV, requeue at the front with its tokens."""
        self.num_preemptions += 1
        self.running.remove(seq)
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.draft = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def update(
        self,
        batch: ScheduledBatch,
        sampled: dict[int, tuple[int, dict[int, float] | None]],
        eos_token_ids: set[int],
    ) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, stop what must stop."""
        finished = []
        for seq, n, do_sample in zip(batch.seqs, batch.num_new_tokens, batch.sample, strict=True):
            if seq.is_finished or seq.status != SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
            if not do_sample or seq.seq_id not in sampled:
                continue
            token, logprobs = sampled[seq.seq_id]
            if token < 0:  # its sampling failed: the request fails alone
                self.finish(seq.seq_id, SequenceStatus.FINISHED_ABORTED)
                finished.append(seq)
                continue
            seq.append_token(token, logprobs)
            status = self._stop_status(seq, token, eos_token_ids)
            if status is not None:
                self.finish(seq.seq_id, status)
                finished.append(seq)
        return finished

    def _stop_status(
        self, seq: Sequence, token: int, eos_token_ids: set[int]
    ) -> SequenceStatus | None:
        p = seq.sampling_params
        if not p.ignore_eos and token in eos_token_ids:
            seq.stop_reason = None
            return SequenceStatus.FINISHED_STOPPED
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return SequenceStatus.FINISHED_STOPPED
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return SequenceStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def finish(self, seq_id: int, status: SequenceStatus) -> None:
        """Stop a sequence (stop string, abort, ...) and free its blocks; idempotent."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_seq(seq)
        seq.status = status

    def detach(self, seq: Sequence) -> list[int]:
        """Hand a running sequence to another scheduler: returns its block table, which stays
        referenced until `block_manager.free_table` (after its KV was copied out)."""
        self.seqs.pop(seq.seq_id, None)
        self.running.remove(seq)
        table, seq.block_table = seq.block_table, []
        self.block_manager.forget_hashes(seq)
        return table

    def adopt(self, seq: Sequence) -> None:
        """Take over a sequence whose blocks were just allocated here (P/D handoff)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.seqs[seq.seq_id] = seq

    def reset(self) -> list[Sequence]:
        """This replica's KV cache died with its worker: every sequence starts over from its
        tokens (prompt and output so far), like a recompute preemption, in a fresh block
        manager. Returns the sequences that had KV to recompute."""
        had_kv = [s for s in self.running if s.num_computed_tokens > 0]
        seqs = self.running + list(self.waiting)
        c = self.config
        self.block_manager = BlockManager(c.num_blocks, c.block_size, c.enable_prefix_caching)
        self.running, self.waiting = [], deque()
        for seq in seqs:
            self.requeue(seq, front=False)
        return had_kv

    def requeue(self, seq: Sequence, front: bool = True) -> None:
        """Queue a sequence to be computed again from its first token (its KV is gone)."""
        seq.block_table, seq.draft = [], []
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def abort_request(self, request_id: str) -> None:
        for seq in [s for s in self.seqs.values() if s.request_id == request_id]:
            self.finish(seq.seq_id, SequenceStatus.FINISHED_ABORTED)

"""The engine: request state, detokenization and stop strings around scheduler + executor."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from afd.builtin import resolve_model, resolve_tokenizer
from afd.config import EngineConfig, ModelConfig
from afd.engine.core_output import TokenTexts, add_text, stopped_by_token
from afd.engine.executor import Sampled, StepInterrupted
from afd.outputs import (
    CompletionOutput,
    Logprob,
    LogprobsEntry,
    RequestMetrics,
    RequestOutput,
)
from afd.quantization import resolve_quantization
from afd.sampling.params import SamplingParams
from afd.sampling.structured import GRAMMAR_DEAD_END, grammar_backend
from afd.scheduler.core.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from afd.scheduler.core.sequence import Sequence, SequenceStatus
from afd.tokenizer import IncrementalDetokenizer, Tokenizer, load_chat_template

logger = logging.getLogger("afd.engine")

# a step that fails this many times in a row with no worker replaced (a fault the requests
# themselves trigger, not the cluster) is bisected to find the request(s) that make it fail
MAX_FAILED_REPLAYS = 2
# while bisecting: raises allowed per halving level (one culprit costs one per level); past
# them the step fails for everyone (a real bug), and its remaining requests fail at once
ISOLATION_FAILURES_PER_LEVEL = 2


@dataclass
class Handoff:
    """A prefilled sequence on its way from a prefill worker to an attention replica."""

    seq: Sequence
    prefill: int
    replica: int
    prefill_table: list[int]
    first_block: int = 0  # blocks [first_block, num_blocks) are copied
    num_blocks: int = 0

    @property
    def blocks(self) -> tuple[list[int], list[int]]:
        """(source blocks on the prefill worker, destination blocks on the replica)."""
        sl = slice(self.first_block, self.num_blocks)
        return self.prefill_table[sl], self.seq.block_table[sl]


@dataclass
class RequestState:
    """A request's prompt and its n sequences with their streaming text state."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    stream: bool = True  # False: step() reports the request only once it has finished
    prompt_logprobs: list[LogprobsEntry | None] | None = None
    error: str | None = None  # why it failed (finish_reason "abort")

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        if self.finished and self.finished_time is None:
            self.finished_time = time.monotonic()
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=d.text,
                    token_ids=list(s.output_token_ids),
                    logprobs=list(s.output_logprobs) if self.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
                for s, d in zip(self.seqs, self.detokenizers, strict=True)
            ],
            finished=self.finished,
            prompt_logprobs=self.prompt_logprobs,
            error=self.error,
            metrics=RequestMetrics(
                self.arrival_time,
                self.first_scheduled_time,
                self.first_token_time,
                self.finished_time,
            ),
        )


def derived_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th request without one when the engine has `seed` (vLLM's
    --seed): every request differs, and the same run of requests repeats."""
    key = f"{seed}:request:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)


class LLMEngine:
    """Owns request state; each step schedules, executes and detokenizes (with
    detokenize=False it leaves text and stop strings to an API process's OutputProcessor)."""

    def __init__(self, config: EngineConfig, detokenize: bool = True):
        from afd.engine.executor import build_executor

        self.config = config
        self.detokenize = detokenize
        source = config.source
        self.model_path: Path = resolve_model(source.model, source.revision, source.download_dir)
        # a different tokenizer (--tokenizer): the engine and every sampler (grammar masks) use it
        self.tokenizer_path: Path = resolve_tokenizer(
            source.tokenizer, source.download_dir, self.model_path
        )
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        resolve_quantization(source.quantization, self.model_config.quant, config.cluster.device)
        self.tokenizer = Tokenizer.from_pretrained(self.tokenizer_path)
        if source.chat_template is not None:
            self.tokenizer.set_chat_template(load_chat_template(source.chat_template))
        self.eos_token_ids: set[int] = set(self.tokenizer.eos_token_ids) | set(
            self.model_config.eos_token_ids
        )
        max_len = self.model_config.max_position_embeddings
        self.max_model_len = min(config.limits.max_model_len or max_len, max_len)
        self.executor = build_executor(
            config,
            self.model_path,
            self.model_config,
            sorted(self.eos_token_ids),
            self.tokenizer_path,
        )
        self._token_texts = TokenTexts(self.tokenizer)
        sched_config = SchedulerConfig(
            max_num_seqs=config.limits.max_num_seqs,
            max_num_batched_tokens=config.limits.max_num_batched_tokens,
            num_blocks=self.executor.num_kv_blocks,
            block_size=config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            max_model_len=self.max_model_len,
        )
        self.schedulers = [Scheduler(sched_config) for _ in range(self.executor.num_replicas)]
        # P/D: prompts run on prefill workers, then their KV moves to an attention replica.
        self.prefill_schedulers = [
            Scheduler(sched_config)
            for _ in range(getattr(self.executor, "num_prefill_replicas", 0))
        ]
        self._handoff: list[Handoff] = []
        self._prefill_inflight: dict[int, ScheduledBatch] = {}  # prefill replica -> its batch
        self.requests: dict[str, RequestState] = {}
        self._seq_owner: dict[int, RequestState] = {}
        self._replica_of: dict[str, tuple[int, int | None]] = {}  # (decode, prefill)
        self._ids = itertools.count()
        self._seeds = itertools.count()  # requests given a seed derived from config.seed
        self.requests_recomputed = 0  # requests whose KV died with a worker and was recomputed
        self._sample_errors: dict[int, str] = {}  # seq_id -> why its sampling failed, this step
        self._prefill_raises: dict[int, int] = {}  # prefill replica -> raises of its plan

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
    ) -> str:
        """Tokenize (if needed) and queue a request; raises ValueError on invalid input. With
        stream=False, step() returns its output only when it finishes (cheaper: the text of a
        request without stop strings is decoded once at the end)."""
        params = params or SamplingParams()
        if params.seed is None and self.config.source.seed is not None:
            params = dataclasses.replace(
                params, seed=derived_seed(self.config.source.seed, next(self._seeds))
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self.validate_prompt(token_ids)
        self.validate_params(params)
        seqs = [Sequence(request_id, i, token_ids, params) for i in range(params.n)]
        state = RequestState(
            request_id,
            text,
            token_ids,
            params,
            seqs,
            [IncrementalDetokenizer(self.tokenizer, token_ids, params) for _ in seqs],
            stream=stream,
        )
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(token_ids)
        replica = self._pick_replica(self.schedulers, seqs[0])
        prefill = (
            self._pick_replica(self.prefill_schedulers, seqs[0])
            if self.prefill_schedulers
            else None
        )
        for seq in seqs:
            (self.schedulers[replica] if prefill is None else self.prefill_schedulers[prefill]).add(
                seq
            )
        self.requests[request_id] = state
        self._replica_of[request_id] = (replica, prefill)
        for seq in seqs:
            self._seq_owner[seq.seq_id] = state
        return request_id

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocabulary size {vocab}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, but this model allows at most "
                f"{self.max_model_len - 1} prompt tokens (max_model_len={self.max_model_len})"
            )

    def validate_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary, and that a
        structured-output spec compiles (compiled once per process, then cached), and n within
        max_num_seqs (each of the n sequences is scheduled like a request)."""
        if params.n > self.config.limits.max_num_seqs:
            raise ValueError(
                f"n must be at most {self.config.limits.max_num_seqs} (max_num_seqs), got "
                f"{params.n}"
            )
        vocab = self.model_config.vocab_size
        if params.max_token_id() >= vocab:
            raise ValueError(
                f"token id {params.max_token_id()} (in stop_token_ids or logit_bias) is out of "
                f"range for vocabulary size {vocab}"
            )
        if params.structured_outputs is not None:
            backend = grammar_backend(
                str(self.tokenizer_path), vocab, tuple(sorted(self.eos_token_ids))
            )
            backend.compile(*params.structured_outputs.spec)

    @staticmethod
    def _pick_replica(schedulers: list[Scheduler], seq: Sequence) -> int:
        """The replica that already caches the longest prefix of the prompt, else the least
        loaded by free KV blocks (ties: fewest requests)."""
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

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        replica, prefill = self._replica_of.pop(request_id)
        self.schedulers[replica].abort_request(request_id)
        if hasattr(self.executor, "release"):
            self.executor.release(replica, [s.seq_id for s in state.seqs])
        if prefill is not None:
            self.prefill_schedulers[prefill].abort_request(request_id)
            for h in [h for h in self._handoff if h.seq.request_id == request_id]:
                self._handoff.remove(h)
                self.prefill_schedulers[h.prefill].block_manager.free_table(h.prefill_table)
                h.seq.status = SequenceStatus.FINISHED_ABORTED
        for seq in state.seqs:
            self._seq_owner.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._handoff or self._prefill_inflight) or any(
            s.has_unfinished for s in self.schedulers + self.prefill_schedulers
        )

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step on every replica; return outputs of requests that changed."""
        transfers = self._place_handoffs()
        batches: list[ScheduledBatch] = [s.schedule() for s in self.schedulers]
        # A prefill worker busy with a long prompt gets no new plan; decode steps go on without
        # waiting for it (its result is picked up by a later step).
        empty = ScheduledBatch()
        new_prefill = [
            empty if p in self._prefill_inflight else s.schedule()
            for p, s in enumerate(self.prefill_schedulers)
        ]
        if all(b.is_empty for b in batches + new_prefill) and not transfers:
            if not self._prefill_inflight:
                return []
        now = time.monotonic()
        for batch in batches + new_prefill:
            for seq in batch.seqs:
                state = self._seq_owner.get(seq.seq_id)
                if state is not None and state.first_scheduled_time is None:
                    state.first_scheduled_time = now  # queue time ends
        self._plan_decode_steps(batches)
        if self.prefill_schedulers:
            for p, b in enumerate(new_prefill):
                if not b.is_empty:
                    self._prefill_inflight[p] = b
        touched: dict[str, RequestState] = {}
        steps, done = self._execute(batches, new_prefill, transfers, touched)
        for t in transfers:
            self.prefill_schedulers[t.prefill].block_manager.free_table(t.prefill_table)
        prefill_batches = [
            self._prefill_inflight.pop(p, empty) if p in done else empty
            for p in range(len(self.prefill_schedulers))
        ]
        for p in done:
            self._prefill_raises.pop(p, None)
        pairs = list(zip(self.schedulers, batches, strict=True))
        pairs += list(zip(self.prefill_schedulers, prefill_batches, strict=True))
        self._apply_prompt_logprobs(self.executor.take_prompt_logprobs())
        for k, sampled in enumerate(steps):
            self._with_logprob_objects(sampled)
            self._apply_sampled([(s, b) for s, b in pairs if k < b.num_steps], sampled, touched)
        for p, (scheduler, batch) in enumerate(
            zip(self.prefill_schedulers, prefill_batches, strict=True)
        ):
            for seq in batch.seqs:
                if seq.seq_id in steps[0] and seq.status == SequenceStatus.RUNNING:
                    replica = self._replica_of[seq.request_id][0]
                    self._handoff.append(Handoff(seq, p, replica, scheduler.detach(seq)))
        for state in touched.values():
            if state.error is not None and not state.finished:
                self.abort_request(state.request_id)  # its other sequences stop too
                for seq in state.seqs:
                    seq.status = SequenceStatus.FINISHED_ABORTED
        outputs = [state.output() for state in touched.values() if state.stream or state.finished]
        for out in outputs:
            if out.finished:
                self._drop(out.request_id)
        return outputs

    def _execute(self, batches, new_prefill, transfers: list[Handoff], touched: dict) -> tuple:
        """Run the step; when a worker failed and the cluster healed, fix up what its failure
        lost and run the step again (the same batches: a replay writes the same KV slots). A
        step that keeps raising with no worker lost is bisected (`_isolate`)."""
        self._sample_errors = {}
        failed_replays = 0
        while True:
            try:
                return self._run(batches, new_prefill, transfers)
            except StepInterrupted as e:
                self._on_recovered(e, batches, new_prefill, transfers)
                failed_replays = 0 if e.lost_worker else failed_replays + 1
                # a prefill plan may raise while a later step runs, and that step's replay may
                # end before it raises again: its raises are counted until it finishes
                for p in e.failed_prefill:
                    self._prefill_raises[p] = self._prefill_raises.get(p, 0) + 1
                if max(failed_replays, *self._prefill_raises.values(), 0) < MAX_FAILED_REPLAYS:
                    continue
                result = self._isolate(e.reason, batches, new_prefill, transfers, touched)
                if result is not None:
                    return result
                failed_replays = 0  # a worker was lost meanwhile: the rest is replayed whole

    def _run(self, batches, new_prefill, transfers: list[Handoff]) -> tuple[list[Sampled], list]:
        """One execute: (sampled tokens per decode step, prefill replicas whose plan finished)."""
        if self.prefill_schedulers:
            steps, done = self.executor.execute(batches, new_prefill, transfers)
        else:
            steps, done = self.executor.execute(batches), []
        self._sample_errors.update(self.executor.sample_errors)
        return steps, done

    def _isolate(self, reason: str, batches, new_prefill, transfers: list[Handoff], touched):
        """The step raised MAX_FAILED_REPLAYS times with no worker lost: find the request(s)
        that make it raise by running parts of it (decode work and each prefill replica's
        batch apart, then halves of a part that raises, until the request is alone), fail
        those and keep what the other parts computed. Each replay is idempotent (the same KV
        slots; sampling is a function of request state). At most ISOLATION_FAILURES_PER_LEVEL
        raises per halving level: a step that raises for everyone fails every request left,
        in bounded time. None when a worker was lost meanwhile (the caller replays the rest)."""
        decode = list(
            dict.fromkeys(
                [s.request_id for b in batches for s in b.seqs]
                + [t.seq.request_id for t in transfers]
            )
        )
        groups = [decode] + [list(dict.fromkeys(s.request_id for s in b.seqs)) for b in new_prefill]
        groups = [g for g in groups if g]
        total = sum(len(g) for g in groups)
        culprits: dict[str, str] = {}
        if len(groups) == 1:  # that part is the whole step, which already raised: halve it
            if total == 1:
                culprits[groups[0][0]] = reason
            groups = _halves(groups[0]) if total > 1 else []
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
            ids = set(group)
            part = (
                [_only(b, ids) for b in batches],
                [_only(b, ids) for b in new_prefill],
                [t for t in transfers if t.seq.request_id in ids],
            )
            try:
                got, finished = self._run(*part)
            except StepInterrupted as e:
                if e.lost_worker or e.dropped_prefill:
                    self._fail_requests(culprits, batches, new_prefill, transfers, touched)
                    self._on_recovered(e, batches, new_prefill, transfers)
                    return None
                failures, reason = failures + 1, e.reason
                if len(group) == 1:
                    culprits[group[0]] = e.reason
                else:
                    groups[:0] = _halves(group)
                continue
            for k, sampled in enumerate(got):
                if k == len(steps):
                    steps.append({})
                steps[k].update(sampled)
            done.update(finished)
        self._fail_requests(culprits, batches, new_prefill, transfers, touched)
        self._prefill_raises.clear()  # every prefill batch ran or failed
        for p, b in enumerate(new_prefill):
            if b.is_empty and p not in done:
                self._prefill_inflight.pop(p, None)  # every request of its plan failed
        return steps, sorted(done)

    def maintain(self) -> None:
        """While idle: let the executor notice and heal a failure now, so the next request (and
        /health) finds the cluster whole; replicas whose KV died start empty."""
        poll = getattr(self.executor, "poll_failures", None)
        e = poll() if poll is not None else None
        if e is not None:
            empty = [ScheduledBatch() for _ in self.schedulers]
            self._on_recovered(e, empty, [ScheduledBatch() for _ in self.prefill_schedulers], [])

    def _on_recovered(self, e: StepInterrupted, batches, new_prefill, transfers) -> None:
        """Requests whose KV lived on a replaced attention or prefill worker are recomputed from
        their prompt and the tokens produced so far; abandoned prefill plans of earlier steps
        join this step's; lists are fixed up in place."""
        recomputed: set[str] = set()
        for r in e.lost_attention:
            recomputed |= {s.request_id for s in self.schedulers[r].reset()}
            batches[r] = ScheduledBatch()
            for t in [t for t in transfers if t.replica == r]:
                transfers.remove(t)  # adopted by replica r, so reset with it
                if t.prefill not in e.lost_prefill:
                    self.prefill_schedulers[t.prefill].block_manager.free_table(t.prefill_table)
        for p in e.lost_prefill:
            scheduler = self.prefill_schedulers[p]
            recomputed |= {s.request_id for s in scheduler.reset()}
            self._prefill_inflight.pop(p, None)
            self._prefill_raises.pop(p, None)
            new_prefill[p] = ScheduledBatch()
            for h in [h for h in self._handoff if h.prefill == p]:
                self._handoff.remove(h)  # its KV died before the copy: prefill it again
                scheduler.requeue(h.seq)
                recomputed.add(h.seq.request_id)
            for t in [t for t in transfers if t.prefill == p]:
                transfers.remove(t)  # the copy cannot happen: recompute on the replica
                replica, batch = self.schedulers[t.replica], batches[t.replica]
                if t.seq in batch.seqs:
                    i = batch.seqs.index(t.seq)
                    for lst in (batch.seqs, batch.num_new_tokens, batch.sample):
                        del lst[i]
                if t.seq in replica.running:
                    replica._preempt(t.seq)
                recomputed.add(t.seq.request_id)
        for p in e.dropped_prefill - e.lost_prefill:
            if p in self._prefill_inflight:  # its worker abandoned it: it runs with the replay
                new_prefill[p] = self._prefill_inflight[p]
        recomputed &= set(self.requests)
        self.requests_recomputed += len(recomputed)
        if recomputed:
            logger.warning("recomputing %d request(s) whose KV died: %s", len(recomputed),
                           ", ".join(sorted(recomputed)[:8]))  # fmt: skip

    def _fail_requests(self, culprits: dict[str, str], batches, new_prefill, transfers,
                       touched: dict) -> None:  # fmt: skip
        """Requests that make a step raise finish with an error (one log line each); they leave
        the step's batches and transfers, and the rest of the engine goes on."""
        for rid, why in culprits.items():
            state = self.requests.get(rid)
            if state is None:
                continue
            logger.warning("request %s failed: the step raised on it: %s", rid, why)
            self.abort_request(rid)
            state.error = f"the engine failed on this request: {why}"
            touched[rid] = state
        ids = set(culprits)
        for b in [*batches, *new_prefill]:
            keep = [i for i, s in enumerate(b.seqs) if s.request_id not in ids]
            for lst in (b.seqs, b.num_new_tokens, b.sample):
                lst[:] = [lst[i] for i in keep]
        for t in [t for t in transfers if t.seq.request_id in ids]:
            transfers.remove(t)  # its copy will not run: the source blocks are free again
            self.prefill_schedulers[t.prefill].block_manager.free_table(t.prefill_table)

    def _plan_decode_steps(self, batches: list[ScheduledBatch]) -> None:
        """With num_scheduler_steps > 1, pure-decode batches run several steps per plan; every
        replica runs the same number, since the expert workers see all of them in lockstep."""
        active = [(s, b) for s, b in zip(self.schedulers, batches, strict=True) if not b.is_empty]
        if self.config.limits.num_scheduler_steps <= 1 or not active:
            return
        k = min(s.max_decode_steps(b, self.config.limits.num_scheduler_steps) for s, b in active)
        if k > 1:
            for scheduler, batch in active:
                scheduler.reserve_decode_steps(batch, k)

    def _apply_sampled(self, pairs, sampled: Sampled, touched: dict[str, RequestState]) -> None:
        """One decode step's tokens: advance the schedulers, detokenize, apply stop strings.
        A sequence that finished in an earlier step of the batch ignores later ones."""
        now = time.monotonic()
        for scheduler, batch in pairs:
            if batch.is_empty:
                continue
            live = [seq for seq in batch.seqs if not seq.is_finished]
            scheduler.update(batch, sampled, self.eos_token_ids)
            for seq in live:
                if seq.seq_id not in sampled:
                    continue
                state = self._seq_owner.get(seq.seq_id)
                if state is None:
                    continue
                state.first_token_time = state.first_token_time or now
                detok = state.detokenizers[seq.index]
                token = sampled[seq.seq_id][0]
                if token < 0:  # its sampling failed on the worker: this request fails alone
                    why = self._sample_errors.get(seq.seq_id, "sampling failed")
                    logger.warning("request %s failed: %s", state.request_id, why)
                    # a grammar dead end is the request's own, not the engine's
                    dead_end = why.startswith(GRAMMAR_DEAD_END)
                    state.error = why if dead_end else f"the engine failed on this request: {why}"
                    touched[state.request_id] = state
                    continue
                by_token = stopped_by_token(
                    seq.status == SequenceStatus.FINISHED_STOPPED,
                    token,
                    state.params,
                    self.eos_token_ids,
                )
                if self.detokenize and add_text(
                    detok,
                    token,
                    by_token=by_token,
                    finished=seq.is_finished,
                    stream=state.stream,
                    params=state.params,
                ):
                    # a stop string ended the text; the scheduler must stop the sequence
                    scheduler.finish(seq.seq_id, SequenceStatus.FINISHED_STOPPED)
                    seq.stop_reason = detok.stop_reason
                touched[state.request_id] = state

    def _logprob_entry(self, entry: dict) -> LogprobsEntry:
        """{token: (logprob, rank)} from a sampler -> {token: Logprob}, with the token's text
        unless an API process's OutputProcessor adds it (detokenize=False)."""
        texts = self._token_texts.text if self.detokenize else None
        return {
            int(t): Logprob(float(lp), int(rank), texts(int(t)) if texts else None)
            for t, (lp, rank) in entry.items()
        }

    def _with_logprob_objects(self, sampled: Sampled) -> None:
        for seq_id, (token, entry) in list(sampled.items()):
            if entry is not None:
                sampled[seq_id] = (token, self._logprob_entry(entry))

    def _apply_prompt_logprobs(self, got: dict[int, list]) -> None:
        """Prompt logprobs by position; a recomputed prompt writes the same positions again."""
        for seq_id, chunks in got.items():
            state = self._seq_owner.get(seq_id)
            if state is None or state.prompt_logprobs is None:
                continue
            for pos, entries in chunks:
                for i, entry in enumerate(entries):
                    if pos + i < len(state.prompt_logprobs):
                        state.prompt_logprobs[pos + i] = self._logprob_entry(entry)

    def _place_handoffs(self) -> list[Handoff]:
        """Give prefilled sequences KV blocks on their attention replica; the KV copy of each
        runs at the start of this step, before the replica computes."""
        placed = []
        for h in list(self._handoff):
            if h.prefill in self._prefill_inflight:
                continue  # its worker is busy; the copy goes with that worker's next plan
            bm = self.schedulers[h.replica].block_manager
            if not bm.can_allocate(h.seq):
                continue  # stays on the prefill worker until the replica has room
            self._handoff.remove(h)
            bm.allocate(h.seq)  # may reuse cached prefix blocks: those need no copy
            bs = self.config.cache.block_size
            h.first_block = h.seq.num_computed_tokens // bs
            h.num_blocks = (h.seq.num_tokens - 1 + bs - 1) // bs
            h.seq.num_computed_tokens = h.seq.num_tokens - 1
            self.schedulers[h.replica].adopt(h.seq)
            placed.append(h)
        return placed

    def _drop(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        where = self._replica_of.pop(request_id, None)
        if state is not None and where is not None and hasattr(self.executor, "release"):
            self.executor.release(where[0], [s.seq_id for s in state.seqs])
        if state is not None:
            for seq in state.seqs:
                self._seq_owner.pop(seq.seq_id, None)

    def failure_stats(self) -> dict:
        """Worker replacements per role, recovery durations (s), requests recomputed."""
        rec = getattr(self.executor, "recovery", None)
        return {
            "worker_restarts": dict(rec.restarts) if rec is not None else {},
            "recovery_seconds": list(rec.seconds) if rec is not None else [],
            "requests_recomputed": self.requests_recomputed,
        }

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: running/waiting requests and KV usage (mean over replicas)."""
        n = len(self.schedulers)
        every = self.schedulers + self.prefill_schedulers
        return {
            "num_requests_running": float(sum(s.num_running for s in every) + len(self._handoff)),
            "num_requests_waiting": float(sum(s.num_waiting for s in every)),
            "kv_cache_usage_perc": sum(s.block_manager.usage for s in self.schedulers) / n,
            "num_preemptions_total": float(sum(s.num_preemptions for s in every)),
            "prefix_cache_queries_total": float(sum(s.prefix_cache_queries for s in every)),
            "prefix_cache_hits_total": float(sum(s.prefix_cache_hits for s in every)),
            **self.executor.stage_times(),
        }

    def shutdown(self) -> None:
        self.executor.shutdown()


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

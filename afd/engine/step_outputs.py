"""The engine's request table and what a step's result does to it: advance the schedulers,
detokenize and apply stop strings, hand prefilled sequences off, fail the requests that made
the step raise, and build the outputs of the requests that changed."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from afd.engine.core_output import TokenTexts, add_text, stopped_by_token
from afd.engine.engine_scheduler import EngineScheduler
from afd.outputs import Logprob, LogprobsEntry, RequestOutput
from afd.sampling.structured import GRAMMAR_DEAD_END
from afd.scheduler.core.sequence import SequenceStatus
from afd.scheduler.core.step import Executor, Sampled, StepPlan, StepResult
from afd.tokenizer import Tokenizer

if TYPE_CHECKING:
    from afd.engine.llm_engine import RequestState

logger = logging.getLogger("afd.engine")


class StepOutputs:
    """Request state by id and by sequence; `process` applies one step's result to it."""

    def __init__(
        self,
        scheduler: EngineScheduler,
        executor: Executor,
        tokenizer: Tokenizer,
        eos_token_ids: set[int],
        detokenize: bool = True,
    ):
        self.scheduler, self.executor = scheduler, executor
        self.eos_token_ids, self.detokenize = eos_token_ids, detokenize
        self._token_texts = TokenTexts(tokenizer)
        self.requests: dict[str, RequestState] = {}
        self._seq_owner: dict[int, RequestState] = {}

    # ---- the request table ----------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        for seq in state.seqs:
            self._seq_owner[seq.seq_id] = state

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; unknown ids are ignored."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        self._release(self.scheduler.abort(request_id), state)

    def _drop(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self._release(self.scheduler.forget(request_id), state)

    def _release(self, where: tuple[int, list[int]] | None, state: RequestState) -> None:
        if where is not None:
            self.executor.release(*where)
        for seq in state.seqs:
            self._seq_owner.pop(seq.seq_id, None)

    # ---- a step ---------------------------------------------------------------------------
    def scheduled(self, plan: StepPlan) -> None:
        """The queue time of a request ends when it is first scheduled."""
        now = time.monotonic()
        for batch in plan.batches + plan.prefill:
            for seq in batch.seqs:
                state = self._seq_owner.get(seq.seq_id)
                if state is not None and state.first_scheduled_time is None:
                    state.first_scheduled_time = now

    def process(self, plan: StepPlan, result: StepResult) -> list[RequestOutput]:
        """Apply a step's result; the outputs of the requests that changed (a request that does
        not stream only once it finished)."""
        touched: dict[str, RequestState] = {}
        self._fail(result.failed, touched)
        prefill_batches = self.scheduler.router.finished(plan, result.finished_prefill)
        pairs = list(zip(self.scheduler.schedulers, plan.batches, strict=True))
        pairs += list(zip(self.scheduler.prefill_schedulers, prefill_batches, strict=True))
        self._apply_prompt_logprobs(result.prompt_logprobs)
        for k, sampled in enumerate(result.steps):
            self._with_logprob_objects(sampled)
            # past a batch's own steps come the tokens of sequences that accepted drafts
            pairs_k = [(s, b if k < b.num_steps else b.draft_run(sampled)) for s, b in pairs]
            self._apply_sampled(pairs_k, sampled, result.sample_errors, touched)
        if self.scheduler.speculative:
            emitted = Counter(seq_id for step in result.steps for seq_id in step)
            for scheduler, batch in pairs[: len(plan.batches)]:
                scheduler.settle_drafts(batch, emitted)
        replica_of = self.scheduler.replica_of
        self.scheduler.router.hand_off(prefill_batches, result.steps[0], lambda r: replica_of[r][0])
        for state in touched.values():
            if state.error is not None and not state.finished:
                self.abort(state.request_id)  # its other sequences stop too
                for seq in state.seqs:
                    seq.status = SequenceStatus.FINISHED_ABORTED
        outputs = [state.output() for state in touched.values() if state.stream or state.finished]
        for out in outputs:
            if out.finished:
                self._drop(out.request_id)
        return outputs

    def _fail(self, failed: dict[str, str], touched: dict[str, RequestState]) -> None:
        """Requests that made the step raise finish with an error (one log line each); the step
        runner already took them out of the schedulers."""
        for rid, why in failed.items():
            state = self.requests.get(rid)
            if state is None:
                continue
            logger.warning("request %s failed: the step raised on it: %s", rid, why)
            self.abort(rid)
            state.error = f"the engine failed on this request: {why}"
            touched[rid] = state

    def _apply_sampled(self, pairs, sampled: Sampled, errors: dict[int, str], touched) -> None:
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
                token = sampled[seq.seq_id][0]
                if token < 0:  # its sampling failed on the worker: this request fails alone
                    why = errors.get(seq.seq_id, "sampling failed")
                    logger.warning("request %s failed: %s", state.request_id, why)
                    # a grammar dead end is the request's own, not the engine's
                    dead_end = why.startswith(GRAMMAR_DEAD_END)
                    state.error = why if dead_end else f"the engine failed on this request: {why}"
                    touched[state.request_id] = state
                    continue
                if self._add_text(scheduler, seq, state, token):
                    # a stop string ended the text; the scheduler must stop the sequence
                    scheduler.finish(seq.seq_id, SequenceStatus.FINISHED_STOPPED)
                    seq.stop_reason = state.detokenizers[seq.index].stop_reason
                touched[state.request_id] = state

    def _add_text(self, scheduler, seq, state: RequestState, token: int) -> bool:
        """Detokenize the token (unless an API process does); whether a stop string ended it."""
        if not self.detokenize:
            return False
        by_token = stopped_by_token(
            seq.status == SequenceStatus.FINISHED_STOPPED, token, state.params, self.eos_token_ids
        )
        return add_text(
            state.detokenizers[seq.index],
            token,
            by_token=by_token,
            finished=seq.is_finished,
            stream=state.stream,
            params=state.params,
        )

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

"""Output processing: a sequence's new tokens -> its text, stop strings and finish. One place for
both shapes: LLMEngine runs it in the engine (offline `LLM`, the one-process server), and an API
process runs it on the deltas of an engine-core process (afd.engine.core_client), whose engine
then only produces tokens."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection

from afd.outputs import CompletionOutput, Logprob, LogprobsEntry, RequestMetrics
from afd.sampling.params import SamplingParams
from afd.tokenizer import IncrementalDetokenizer, Tokenizer


def stopped_by_token(
    stopped: bool, token: int, params: SamplingParams, eos_token_ids: Collection[int]
) -> bool:
    """Whether a sequence that stopped (finish_reason "stop") stopped on this EOS or stop
    token, whose own text is then left out (as in vLLM)."""
    if not stopped or params.include_stop_str_in_output:
        return False
    return token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids)


def add_text(
    detok: IncrementalDetokenizer,
    token: int,
    *,
    by_token: bool,
    finished: bool,
    stream: bool,
    params: SamplingParams,
) -> bool:
    """One new token into the sequence's text; True when a stop string ends the sequence.
    `by_token`: it stopped on this token (stopped_by_token). Text nobody reads before the end
    (stream=False, no stop strings) is decoded once, at the end."""
    if by_token:
        detok.finalize()
        return False
    if not (stream or finished or params.stop):
        detok.defer_token(token)
        return False
    return detok.add_token(token, final=finished)


class TokenTexts:
    """Each token's own text (a logprob's decoded_token), decoded once per process."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], False)
        return text

    def named(self, entry: LogprobsEntry) -> LogprobsEntry:
        """The entry with every decoded_token filled in."""
        return {t: Logprob(lp.logprob, lp.rank, self.text(t)) for t, lp in entry.items()}


class OutputProcessor:
    """The text side of one request in an API process: deltas of token ids from the core ->
    cumulative CompletionOutputs with text, stop strings applied (a sequence a stop string
    ends drops the core's later tokens; the request then finishes here)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: Collection[int],
        texts: TokenTexts,
    ):
        self.params, self.eos_token_ids, self.texts = params, eos_token_ids, texts
        self.detoks = [
            IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for _ in range(params.n)
        ]
        self.outputs = [CompletionOutput(i, "", [], None, None) for i in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    def add(self, index: int, token_ids: list[int], logprobs, finish_reason, stop_reason) -> None:
        """A sequence's new tokens (and logprobs) of one step, and how the core finished it."""
        old = self.outputs[index]
        if old.finish_reason is not None:
            return  # a stop string ended it here; the core had not heard yet
        detok, kept = self.detoks[index], 0
        for j, token in enumerate(token_ids):
            kept = j + 1
            finished = kept == len(token_ids) and finish_reason is not None
            by_token = finished and stopped_by_token(
                finish_reason == "stop", token, self.params, self.eos_token_ids
            )
            if add_text(detok, token, by_token=by_token, finished=finished, stream=True,
                        params=self.params):  # fmt: skip
                finish_reason, stop_reason = "stop", detok.stop_reason
                break
        if logprobs is not None:
            logprobs = (old.logprobs or []) + [self.texts.named(e) for e in logprobs[:kept]]
        else:
            logprobs = old.logprobs
        self.outputs[index] = CompletionOutput(
            index, detok.text, old.token_ids + token_ids[:kept], logprobs, finish_reason,
            stop_reason,
        )  # fmt: skip

    def metrics(self, metrics: RequestMetrics | None) -> RequestMetrics | None:
        """The core's timings; finished now when a stop string ended the request here."""
        if metrics is not None and self.finished and metrics.finished_time is None:
            return dataclasses.replace(metrics, finished_time=time.monotonic())
        return metrics

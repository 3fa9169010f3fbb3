"""A sequence: one of a request's n completions, with its tokens and KV block table."""

from __future__ import annotations

import enum
import itertools
import time

from afd.sampling.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


_seq_ids = itertools.count()


class Sequence:
    """Token ids (prompt then output), how many have KV in the cache, and the block table."""

    def __init__(
        self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams
    ):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.sampling_params = params
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_logprobs: list[dict[int, float]] = []
        self.arrival_time = time.monotonic()
        self.draft: list[int] = []  # speculative tokens verified in this step (afd.spec)
        self.draft_state = None  # afd.spec.drafter.DraftState, made when it first drafts

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None

    def append_token(self, token_id: int, logprobs: dict[int, float] | None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def prompt_logprob_targets(self, start: int, n: int) -> list[int]:
        """For prompt_logprobs: the prompt tokens that positions start .. start + n - 1 predict
        (only sequence 0 of a request reports them)."""
        if self.sampling_params.prompt_logprobs is None or self.index != 0:
            return []
        return self.token_ids[start + 1 : min(start + n + 1, self.num_prompt_tokens)]

    def block(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size : (i + 1) * block_size]

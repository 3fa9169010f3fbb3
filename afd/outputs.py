"""Request outputs, shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability, its rank in the distribution (1 = most likely) and its
    text, as vLLM returns them."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per position: token id -> Logprob, for the chosen token and the top-k alternatives
LogprobsEntry = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One sequence of a request so far: cumulative text and token ids, per-token logprobs
    ({token_id: Logprob}, the sampled token and the top-k) when asked for."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[LogprobsEntry] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None


@dataclass
class RequestMetrics:
    """When a request arrived, was first scheduled, got its first token and finished
    (time.monotonic() seconds of the engine's process; None: not yet), as vLLM's."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A cumulative snapshot of one request; the last one has finished=True. prompt_logprobs
    (when asked for) has one entry per prompt token, None for the first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    prompt_logprobs: list[LogprobsEntry | None] | None = None
    error: str | None = None  # why the request failed (it finished with finish_reason "abort")
    metrics: RequestMetrics | None = None

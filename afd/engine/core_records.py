"""The records the engine-core process and its API processes exchange over ZMQ (msgpack through
msgspec: every frame is decoded into a declared record and validated, nested fields included;
nothing is pickled). API -> core: requests, aborts, hello, shutdown; core -> API: the outputs of
one step, batched per API process; core -> every API: status (health, stats) several times a
second."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from afd.config import EngineConfig
from afd.outputs import Logprob, RequestMetrics
from afd.sampling.params import INT64_MAX, INT64_MIN, SamplingParams

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
TokenId = Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)]  # -1: the sampling failed


class _Record(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    pass


# -- API -> core ---------------------------------------------------------------------------------


class Hello(_Record, tag="hello"):
    """An API process is up: the core connects to its output socket and answers Welcome."""

    client: Annotated[int, msgspec.Meta(ge=0, le=2**16)]
    pid: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    output_address: str


class AddRequest(_Record, tag="add"):
    """A tokenized request; `arrival` is time.monotonic() of the API process (one clock per
    host on Linux)."""

    client: Annotated[int, msgspec.Meta(ge=0, le=2**16)]
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    prompt_token_ids: list[Int64]
    params: SamplingParams
    arrival: float


class Abort(_Record, tag="abort"):
    """Stop these requests and free their KV blocks; unknown ids are ignored."""

    client: Annotated[int, msgspec.Meta(ge=0, le=2**16)]
    request_ids: list[str]


class Shutdown(_Record, tag="shutdown"):
    """Stop the engine (its workers too) and exit."""


ToCore = Hello | AddRequest | Abort | Shutdown

# -- core -> API ---------------------------------------------------------------------------------


class Welcome(_Record, tag="welcome"):
    """What an API process needs of the engine: its settings and the tokenizer to load."""

    config: EngineConfig
    tokenizer_path: str
    max_model_len: int
    sequence_capacity: int
    eos_token_ids: list[int]


class SeqDelta(_Record):
    """What one sequence gained this step: new tokens (and their logprobs), and whether the
    core finished it (length, EOS, a stop token; stop strings are the API process's)."""

    index: int
    token_ids: list[TokenId]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None


# why a request failed, as the API raises it: a bad request (400), admission full (503), the
# request alone failed in the engine, or the engine cannot serve
ERROR_KINDS = ("invalid", "overloaded", "failed", "dead")


class RequestDelta(_Record):
    """One request's change in one step."""

    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    error: str | None = None
    error_kind: str | None = None  # one of ERROR_KINDS when error is set
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # sent once, when complete
    metrics: RequestMetrics | None = None


class Outputs(_Record, tag="outputs"):
    """Every change of one step for one API process."""

    requests: list[RequestDelta]


class Status(_Record, tag="status"):
    """Published several times a second: health, the /metrics gauges, failure counters."""

    ok: bool
    reason: str
    stats: dict[str, float]
    failure_stats: dict[str, Any]


FromCore = Welcome | Outputs


class CoreSpec(_Record):
    """How the launcher starts a core (its stdin): settings, admission, where to listen."""

    config: EngineConfig
    max_queue_len: int
    input_address: str
    status_address: str
    parent_pid: int


encode = msgspec.msgpack.Encoder().encode
to_core = msgspec.msgpack.Decoder(ToCore)
from_core = msgspec.msgpack.Decoder(FromCore)
status_decoder = msgspec.msgpack.Decoder(Status)
spec_decoder = msgspec.msgpack.Decoder(CoreSpec)

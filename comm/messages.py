"""The records of the control plane, as msgspec Structs: the worker spec, the driver's plans
(with their plan entries), the workers' answers. Each direction is one tagged union (`type`
is the tag), decoded by `afd.comm.wire` into the right record with every field checked,
nested ones included; an unknown or ill-typed field or a missing required one is an error.

Integers that reach torch or the sampler are signed 64-bit (msgpack also carries uint64);
sampler floats must be finite."""

from __future__ import annotations

import sys
from typing import Annotated

import msgspec
from msgspec import Meta, Struct, field

from afd.sampling.params import SamplingParams
from afd.spec.config import MAX_SPECULATIVE_TOKENS

I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Index = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # ids, positions, counts, block numbers
Finite = Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]  # no NaN, inf
# token id -> (logprob, rank); rank 1 is the most likely token (-inf is a logprob)
TokenLogprobs = dict[I64, tuple[float, Index]]
TraceEvent = tuple[str, str, int, int]  # (lane, label, start_ns, end_ns), see StageClock


class Record(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A control-plane record: unknown fields are errors, defaults stay off the wire."""


# ---- the worker spec ----------------------------------------------------------------------------


class WorkerSpec(Record, frozen=True):
    """What every worker process starts with (the same on every node, but for rank and device,
    which spawn_node_workers sets per worker); built by `scheduler.cluster.worker_spec`."""

    model_path: str
    tokenizer_dir: str  # the tokenizer grammar masks are built from
    dtype: str  # torch dtype name
    device: str
    block_size: Index
    num_kv_blocks: Index
    world_size: Index
    init_addr: str  # host:port of the driver's TCPStore
    driver_addr: str
    inbox_addrs: dict[Index, str]  # rank -> address of its plan socket
    num_attention_workers: Index
    num_expert_workers: Index
    expert_ranks: list[Index]
    comm_backend: str  # resolved: torch | shm | deepep
    dist_backend: str  # gloo when workers share GPUs, else auto
    gpus_per_node: Index | None
    dispatch_dtype: str
    quantization: str | None
    shm_dir: str | None
    threads: Index
    dist_timeout_s: Finite
    eos_token_ids: list[I64] = []
    rank: int = -1  # -1 in the cluster's spec; each worker's own rank in its copy


# ---- plans: driver -> worker ----------------------------------------------------------------


class SampleSpec(Record, frozen=True):
    """What a worker's sampler needs of a request's SamplingParams (its `wire` dict, typed).
    Frozen and hashable: workers build each distinct SamplingParams once."""

    temperature: Finite = 1.0
    top_p: Finite = 1.0
    top_k: I64 = 0
    min_p: Finite = 0.0
    seed: I64 | None = None
    logprobs: I64 | None = None
    presence_penalty: Finite = 0.0
    frequency_penalty: Finite = 0.0
    repetition_penalty: Finite = 1.0
    logit_bias: tuple[tuple[I64, Finite], ...] | None = None  # ((token, bias), ...)
    min_tokens: I64 = 0
    stop_token_ids: tuple[I64, ...] = ()
    ignore_eos: bool = False
    prompt_logprobs: I64 | None = None
    structured_outputs: tuple[str, str] | None = None  # (kind, text)

    @classmethod
    def of(cls, params: SamplingParams) -> SampleSpec:
        """The spec of a request's (already validated) SamplingParams."""
        return msgspec.convert(params.wire, cls)

    def to_params(self) -> SamplingParams:
        """The SamplingParams this spec was made from (as far as sampling goes); ValueError if
        its values are out of range."""
        values = {f: getattr(self, f) for f in self.__struct_fields__}
        return SamplingParams.from_wire({k: v for k, v in values.items() if v is not None})


class PlanEntry(Record):
    """One sequence's part of a micro-batch: `tokens` at positions start.., its KV in
    `block_table`. `params` goes with entries that sample or compute prompt logprobs, and
    with it `index` (the request's sequence index, for seeded draws) and `prompt_len`;
    `prompt_targets`: the prompt tokens the chunk's positions predict (prompt logprobs);
    `history`: the tokens before `start`, for a worker that holds no sampler state for it yet
    and a request that needs it (penalties, structured outputs); `draft`: speculative tokens
    after `tokens`, verified in the same forward (afd.attention_nodes.verify)."""

    seq_id: Index
    tokens: list[I64]
    start: Index
    block_table: list[Index]
    sample: bool = False
    params: SampleSpec | None = None
    index: Index = 0
    prompt_len: Index = 0
    prompt_targets: list[I64] = []
    history: list[I64] | None = None
    draft: Annotated[list[Index], Meta(max_length=MAX_SPECULATIVE_TOKENS)] = []


class KvTransfer(Record, array_like=True):
    """A sequence's KV blocks to move between a prefill and an attention worker: `peer` is the
    rank on the other side, `blocks` the block ids on this side."""

    seq_id: Index
    peer: Index
    blocks: list[Index]


class DriverMessage(Record, tag_field="type"):
    """A message the driver sends a worker."""


class AttnStep(DriverMessage, tag="attn_step"):
    """A step plan for an attention worker: micro-batches of entries, KV to import first,
    sampler states to drop, and how many decode steps to run."""

    step: int
    micro_batches: list[list[PlanEntry]]
    num_steps: Annotated[int, Meta(ge=1, le=1024)] = 1  # --num-scheduler-steps' range
    release: list[Index] = []
    imports: list[KvTransfer] = []
    trace: bool = False


class PrefillStep(DriverMessage, tag="prefill_step"):
    """A prefill worker's plan: one batch (may be empty) and the KV exports it owes."""

    step: int
    entries: list[PlanEntry]
    exports: list[KvTransfer] = []
    trace: bool = False


class ExpertStep(DriverMessage, tag="expert_step"):
    """An expert worker's plan: which attention ranks send, and how many exchanges."""

    step: int
    sources: list[Index]
    num_micro_batches: Annotated[int, Meta(ge=1, le=1024)]  # --num-micro-batches' range
    num_steps: Annotated[int, Meta(ge=1, le=1024)] = 1
    trace: bool = False


class Abort(DriverMessage, tag="abort"):
    """Leave the step and the data plane; generation `gen` comes next."""

    gen: int


class Reform(DriverMessage, tag="reform"):
    """Join data-plane generation `gen`."""

    gen: int


class Shutdown(DriverMessage, tag="shutdown"):
    """Exit."""


Plan = AttnStep | PrefillStep | ExpertStep
ToWorker = AttnStep | PrefillStep | ExpertStep | Abort | Reform | Shutdown


# ---- answers: worker -> driver --------------------------------------------------------------


class WorkerMessage(Record, tag_field="type"):
    """Every worker message carries its rank, its incarnation (`inc`: random per process) and
    the data-plane generation it is in (`gen`), so the driver can ignore a replaced process's
    messages and those of an abandoned generation."""

    rank: Index
    inc: Index
    gen: int


class Ready(WorkerMessage, tag="ready"):
    role: str
    param_bytes: Index
    pid: Index


class Error(WorkerMessage, tag="error"):
    """The worker is dying of this."""

    role: str
    message: str


class Aborted(WorkerMessage, tag="aborted"):
    pass


class Joined(WorkerMessage, tag="joined"):
    pass


class StepFailed(WorkerMessage, tag="step_failed"):
    step: int
    message: str


class ReformFailed(WorkerMessage, tag="reform_failed"):
    message: str


class Sampled(Record, array_like=True):
    """A sampled token (-1 where sampling failed) and its logprobs when asked for."""

    seq_id: Index
    token: I64
    logprobs: TokenLogprobs | None = None


class SampleError(Record, array_like=True):
    """Why a sequence's sampling failed (its token is -1)."""

    seq_id: Index
    message: str


class PromptLogprobs(Record, array_like=True):
    """Logprobs of the prompt tokens from `position` on, one map per token."""

    seq_id: Index
    position: Index
    entries: list[TokenLogprobs]


class WireBytes(Record):
    """Bytes an attention worker put on the data plane (A->F) and got back (F->A)."""

    dispatch: Index = 0
    combine: Index = 0


class StepResult(WorkerMessage):
    """What every result has: its step, seconds per stage and, when tracing, events."""

    step: int
    times: dict[str, float] = {}
    events: list[TraceEvent] = []


class AttnResult(StepResult, tag="attn_result"):
    sampled: list[list[Sampled]] = []  # per decode step of the plan (+ accepted drafts')
    errors: list[SampleError] = []
    prompt_logprobs: list[PromptLogprobs] = []
    wire: WireBytes = field(default_factory=WireBytes)


class PrefillResult(StepResult, tag="prefill_result"):
    sampled: list[Sampled] = []
    errors: list[SampleError] = []
    prompt_logprobs: list[PromptLogprobs] = []


class ExpertResult(StepResult, tag="expert_result"):
    load: list[Index] = []  # routed tokens per expert of the shard


FromWorker = (
    Ready | Error | Aborted | Joined | StepFailed | ReformFailed
    | AttnResult | PrefillResult | ExpertResult
)  # fmt: skip


# ---- the supervisor's pipe: child -> its supervisor -------------------------------------------


class Heartbeat(Record, tag_field="type", tag="heartbeat"):
    """Seconds the child's main thread has made no progress."""

    stuck: Finite


class Crashed(Record, tag_field="type", tag="crashed"):
    """The child's uncaught exception (traceback text)."""

    error: str


ToSupervisor = Heartbeat | Crashed

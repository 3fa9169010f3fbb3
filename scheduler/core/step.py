"""The records of one engine step and the contract of whatever runs it: the engine builds a
`StepPlan`, an `Executor` runs it and answers a `StepResult`. Imports neither the engine nor
the cluster driver, so both sides (and the executors) can import it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from afd.scheduler.core.scheduler import ScheduledBatch
    from afd.scheduler.core.sequence import Sequence

# seq_id -> (token, logprobs {token: (logprob, rank)} or None)
Sampled = dict[int, tuple[int, dict[int, tuple[float, int]] | None]]


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


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one step runs: a batch per attention replica, a batch per prefill replica (empty
    for a busy one) and the KV copies of prefilled sequences to their replica. The lists are
    fixed up in place when a failure changed what can run (see StepRunner)."""

    batches: list[ScheduledBatch]
    prefill: list[ScheduledBatch] = field(default_factory=list)
    transfers: list[Handoff] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        """Decode steps the plan runs (every replica runs the same number)."""
        return max((b.num_steps for b in self.batches if not b.is_empty), default=1)

    @property
    def is_empty(self) -> bool:
        return not self.transfers and all(b.is_empty for b in self.batches + self.prefill)


@dataclass(slots=True)
class StepResult:
    """What a step produced: sampled tokens per decode step (a prefill's first token in step
    0), the prefill replicas whose plan (of this or an earlier step) finished, why a sequence's
    sampling failed (its token is -1), and prompt logprobs (seq_id -> [[position, entries]]).
    The step runner adds the requests that failed the step and the replicas that were reset."""

    steps: list[Sampled]
    finished_prefill: list[int] = field(default_factory=list)
    sample_errors: dict[int, str] = field(default_factory=dict)
    prompt_logprobs: dict[int, list] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why it failed
    reset_replicas: set[int] = field(default_factory=set)  # attention replicas, KV lost
    reset_prefill: set[int] = field(default_factory=set)  # prefill replicas, KV lost


@dataclass
class RecoveryStats:
    """What the cluster went through: replacements per role, how long each recovery took, and
    the nodes declared lost (node rank as a string -> times)."""

    restarts: dict[str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)
    nodes_lost: dict[str, int] = field(default_factory=dict)


class StepInterrupted(RuntimeError):
    """A step failed (a worker died, hung or raised) and the executor is whole again: the engine
    fixes up the requests whose KV died (`lost_attention`, `lost_prefill`: replicas whose worker
    was replaced), sends again the prefill plans of earlier steps that were abandoned
    (`dropped_prefill`: replicas whose worker lives) and runs the step again (a replay writes
    the same KV slots). `lost_expert`: expert ranks whose worker was replaced (they hold no
    request state, but the failure was theirs, not the step's). Nothing lost means the step
    itself raised: the engine may bisect it; `failed_prefill`: the prefill replica whose plan
    raised (a plan of an earlier step may fail during a later one)."""

    def __init__(
        self,
        reason: str,
        lost_attention: set[int],
        lost_prefill: set[int],
        dropped_prefill: set[int] | None = None,
        failed_prefill: set[int] | None = None,
        lost_expert: set[int] | None = None,
    ):
        super().__init__(reason)
        self.reason, self.lost_attention, self.lost_prefill = reason, lost_attention, lost_prefill
        self.dropped_prefill = dropped_prefill or set()
        self.failed_prefill = failed_prefill or set()
        self.lost_expert = lost_expert or set()

    @property
    def lost_worker(self) -> bool:
        """A worker was replaced: the failure is not the fault of the requests in the step."""
        return bool(self.lost_attention or self.lost_prefill or self.lost_expert)


# The start of /health's reason while the cluster waits for a lost node to come back: 503 and
# every request fails at once, but the server stays up (the launcher's watchdog keeps it).
WAITING_FOR_NODE = "waiting for node"


def waiting_for_node(reason: str) -> bool:
    """Whether an unhealthy reason is the wait for a lost node (it may end) rather than fatal."""
    return reason.startswith(WAITING_FOR_NODE)


class ClusterUnavailable(RuntimeError):
    """The executor cannot run steps now but may later (a lost node may rejoin): every request
    in flight ends with this error; the engine stays up and new requests fail until health()
    is ok again."""


class Executor(Protocol):
    """Everything the engine uses of whatever runs the model; every executor implements all."""

    num_replicas: int  # attention replicas, each with its own KV cache and scheduler
    num_prefill_replicas: int  # prefill workers (P/D); 0 when prompts run on the replicas
    num_kv_blocks: int  # blocks per replica
    recovery: RecoveryStats  # worker replacements and recovery durations so far

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step; raises StepInterrupted when it failed and the executor is whole again
        (the caller fixes up the plan and runs it again)."""
        ...

    def release(self, replica: int, seq_ids: list[int]) -> None:
        """Finished sequences whose sampler state the replica may drop."""
        ...

    def poll_failures(self) -> StepInterrupted | None:
        """Between steps: heal a failure now; what the engine must fix up, if anything."""
        ...

    def stage_times(self) -> dict[str, float]: ...

    def check_alive(self) -> None: ...

    def health(self) -> tuple[bool, str]:
        """(can serve, why not or what is being recovered)."""
        ...

    def shutdown(self) -> None: ...

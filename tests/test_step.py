"""The step records and the step runner alone (no model): a plan in, a result out; what the
runner did about failures comes back as data."""

from __future__ import annotations

import inspect

from afd.engine.engine_scheduler import EngineScheduler
from afd.engine.executor import LocalExecutor
from afd.engine.step_runner import MAX_FAILED_REPLAYS, StepRunner
from afd.sampling.params import SamplingParams
from afd.scheduler.cluster.executor import AFDExecutor
from afd.scheduler.core.scheduler import SchedulerConfig
from afd.scheduler.core.sequence import Sequence
from afd.scheduler.core.step import Executor, RecoveryStats, StepInterrupted, StepPlan, StepResult


class FakeExecutor:
    """Samples token 7 for every sequence that samples; raises (nothing lost) on any plan with
    a request in `poison`; the first `lose` executes lose attention replica 0 instead."""

    num_replicas, num_prefill_replicas, num_kv_blocks = 1, 0, 64

    def __init__(self, poison: set[str] = frozenset(), lose: int = 0):
        self.poison, self.lose = poison, lose
        self.recovery = RecoveryStats()
        self.calls: list[set[str]] = []
        self.released: list[tuple[int, list[int]]] = []

    def execute(self, plan: StepPlan) -> StepResult:
        ids = {s.request_id for b in plan.batches for s in b.seqs}
        self.calls.append(ids)
        if self.lose:
            self.lose -= 1
            raise StepInterrupted("attention worker 0 died", {0}, set())
        if ids & self.poison:
            raise StepInterrupted("boom", set(), set())
        seqs = [s for b in plan.batches for s, smp in zip(b.seqs, b.sample, strict=True) if smp]
        sampled = {s.seq_id: (7, None) for s in seqs}
        return StepResult([sampled])

    def release(self, replica: int, seq_ids: list[int]) -> None:
        self.released.append((replica, seq_ids))

    def poll_failures(self) -> StepInterrupted | None:
        return None


def scheduled(names: list[str]) -> tuple[EngineScheduler, StepPlan]:
    sched = EngineScheduler(SchedulerConfig(num_blocks=64, block_size=4), 1, 0)
    params = SamplingParams(temperature=0, max_tokens=4)
    for i, name in enumerate(names):
        sched.add(name, [Sequence(name, 0, [3 + i, 4, 5], params)])
    plan = sched.schedule()
    assert plan is not None and plan.num_steps == 1
    return sched, plan


def test_a_poisoned_request_is_reported_failed_and_the_rest_keeps_its_tokens():
    names = ["a", "b", "bad", "c", "d"]
    sched, plan = scheduled(names)
    ex = FakeExecutor(poison={"bad"})
    result = StepRunner(ex, sched).execute(plan)
    assert result.failed == {"bad": "boom"}
    assert sorted(len(c) for c in ex.calls[:MAX_FAILED_REPLAYS]) == [5, 5]  # whole-step tries
    tokens = {s.request_id: result.steps[0][s.seq_id][0] for s in plan.batches[0].seqs}
    assert tokens == dict.fromkeys(["a", "b", "c", "d"], 7)  # "bad" left the plan
    assert "bad" not in sched.replica_of and [r for r, _ in ex.released] == [0]
    assert not result.reset_replicas


def test_a_lost_replica_is_reported_reset_and_the_step_replayed():
    sched, plan = scheduled(["a", "b"])
    ex = FakeExecutor(lose=1)
    result = StepRunner(ex, sched).execute(plan)
    assert result.reset_replicas == {0} and not result.failed
    assert len(ex.calls) == 2 and plan.batches[0].is_empty  # its batch died with its KV
    assert all(s.num_waiting == 2 for s in sched.schedulers)  # requeued, to run again


def test_every_executor_has_what_the_protocol_declares():
    methods = [n for n, v in vars(Executor).items() if inspect.isfunction(v) and n[0] != "_"]
    assert {"execute", "release", "poll_failures", "health"} <= set(methods)
    for cls in (LocalExecutor, AFDExecutor):
        missing = [n for n in methods if not inspect.isfunction(getattr(cls, n, None))]
        assert not missing, (cls.__name__, missing)
    assert set(Executor.__annotations__) == {
        "num_replicas", "num_prefill_replicas", "num_kv_blocks", "recovery"
    }  # fmt: skip

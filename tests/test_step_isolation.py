"""A request that makes a step raise (a forward, a kernel) fails alone: the engine bisects the
step until that request is alone, fails it with an error and keeps the others' tokens equal to
a fault-free run; a step that raises for everyone still ends after a bounded number of tries.
Also: a worker SIGKILLed in the middle of a bisection, a request that raises inside a multi-step
plan, and a prefill plan whose second raise arrives after the replay finished."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
from conftest import assert_cleaned_up, greedy_and_seeded, mixed_prompts

from afd import LLM, SamplingParams
from afd.attention_nodes.worker import FAULT_TOKEN_ENV
from afd.engine.step_runner import ISOLATION_FAILURES_PER_LEVEL, MAX_FAILED_REPLAYS
from afd.scheduler.core.step import StepInterrupted

POISON = 511  # the token that makes a forward raise; no other prompt or output has it
FIRST_WAVE = 8


def workload() -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded requests; index FIRST_WAVE is the poisoned one (joins later)."""
    out = greedy_and_seeded(mixed_prompts(12, 500, seed=7), 5, 6, seed=50)
    prompt, sp = out[FIRST_WAVE]
    out[FIRST_WAVE] = ([*prompt[:2], POISON, *prompt[2:]], sp)
    return out


def late_poison(llm: LLM) -> list[tuple[list[int], SamplingParams]]:
    """workload() whose poisoned request has no POISON in its prompt but samples it as its
    second token (seeded, POISON's logit raised; the seed is found on this fault-free engine,
    and any topology or K samples the same), so that the forward computes POISON in a decode
    plan, at its step 1 when the plan runs several steps."""
    work = workload()
    prompt = [t for t in work[FIRST_WAVE][0] if t != POISON]

    def params(seed: int, n: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=n, ignore_eos=True,
                              logit_bias={POISON: 6.0})  # fmt: skip

    outs = llm.generate([prompt] * 64, [params(s, 2) for s in range(64)], use_tqdm=False)
    firsts = [o.outputs[0].token_ids for o in outs]
    seed = next(s for s, t in enumerate(firsts) if t[0] != POISON and t[1] == POISON)
    work[FIRST_WAVE] = (prompt, params(seed, 8))
    return work


def run(llm: LLM, skip_poison: bool = False, work: list | None = None) -> dict[int, object]:
    """Stream the workload: the first wave, then the rest (poisoned one included) while the
    first wave decodes. Returns the finished output of every request by index."""
    eng = llm.engine
    work = work or workload()
    ids: dict[str, int] = {}
    done: dict[int, object] = {}
    for step in range(200):
        if step in (0, 2):
            for i, (p, sp) in enumerate(work):
                if (i < FIRST_WAVE) == (step == 0) and not (skip_poison and i == FIRST_WAVE):
                    ids[eng.add_request(p, sp)] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.request_id]] = out
        if len(done) == len(ids) and step >= 2:
            return done
    raise AssertionError("the workload did not finish in 200 steps")


def poisoned_fails_alone(got: dict, expected: dict, why: str):
    """The poisoned request failed with `why` ("abort"); every other one has the tokens of the
    fault-free run. Returns the poisoned request's output."""
    bad = got.pop(FIRST_WAVE)
    assert bad.error is not None and why in bad.error
    assert bad.outputs[0].finish_reason == "abort"
    assert all(o.error is None for o in got.values())
    assert {i: o.outputs[0].token_ids for i, o in got.items()} == {
        i: o.outputs[0].token_ids for i, o in expected.items()
    }
    return bad


def poisoned(seq) -> bool:
    """Whether the sequence is the poisoned request's (workload() or late_poison())."""
    return POISON in seq.token_ids or POISON in (seq.sampling_params.logit_bias or {})


def raising_plans(monkeypatch, llm: LLM) -> list[int]:
    """From now on: the decode steps of every execute (a whole step or a part of a bisection)
    that raised with the poisoned request in it."""
    runner = llm.engine.runner
    real = runner._run
    steps: list[int] = []

    def recorded(plan):
        try:
            return real(plan)
        except StepInterrupted:
            if any(poisoned(s) for b in [*plan.batches, *plan.prefill] for s in b.seqs):
                steps.append(max(b.num_steps for b in plan.batches))
            raise

    monkeypatch.setattr(runner, "_run", recorded)
    return steps


def poison_the_forward(monkeypatch, llm: LLM, always: bool = False) -> None:
    """The last layer's FFN raises when the forward computes POISON (after every layer
    wrote its KV: a replay writes the same slots again)."""
    model = llm.engine.executor.runner.model
    seen = {}
    embed, last = model.embed, model.layers[-1]
    ffn = last.ffn_part

    def spy_embed(input_ids):
        seen["ids"] = input_ids
        return embed(input_ids)

    def failing_ffn(x):
        if always or bool((seen["ids"] == POISON).any()):
            raise RuntimeError("a kernel failed")
        return ffn(x)

    monkeypatch.setattr(model, "embed", spy_embed)
    monkeypatch.setattr(last, "ffn_part", failing_ffn)


def count_executes(monkeypatch, llm: LLM) -> list[bool]:
    """Every execute from now on: whether it raised."""
    calls: list[bool] = []
    ex = llm.engine.executor
    real = ex.execute

    def counted(plan):
        calls.append(True)
        out = real(plan)
        calls[-1] = False
        return out

    monkeypatch.setattr(ex, "execute", counted)
    return calls


@pytest.fixture(scope="module")
def llm():
    llm = LLM("tiny-qwen3-moe", dtype="float32", block_size=4)
    yield llm
    llm.shutdown()


def test_a_request_whose_forward_raises_fails_alone(llm, monkeypatch, caplog):
    expected = run(llm, skip_poison=True)
    assert all(POISON not in o.outputs[0].token_ids for o in expected.values())
    poison_the_forward(monkeypatch, llm)
    calls = count_executes(monkeypatch, llm)
    bad = poisoned_fails_alone(run(llm), expected, "a kernel failed")
    # 2 tries of the step, then one failed part per halving level (10 requests in the step)
    assert MAX_FAILED_REPLAYS < sum(calls) <= MAX_FAILED_REPLAYS + 5, calls
    assert any(bad.request_id in r.message and "a kernel failed" in r.message
               for r in caplog.records)  # fmt: skip
    sched = llm.engine.schedulers[0]
    assert sched.block_manager.num_free_blocks == sched.config.num_blocks


def test_a_step_that_raises_for_everyone_fails_its_requests_in_bounded_tries(llm, monkeypatch):
    eng = llm.engine
    work = workload()[:6]
    ids = [eng.add_request(p, sp) for p, sp in work]
    poison_the_forward(monkeypatch, llm, always=True)
    calls = count_executes(monkeypatch, llm)
    outs = {o.request_id: o for o in eng.step()}
    assert sorted(outs) == sorted(ids)
    assert all(o.finished and "a kernel failed" in o.error for o in outs.values())
    budget = ISOLATION_FAILURES_PER_LEVEL * ((len(ids) - 1).bit_length() + 1)
    assert all(calls) and MAX_FAILED_REPLAYS < len(calls) <= MAX_FAILED_REPLAYS + budget, calls
    monkeypatch.undo()
    again = llm.generate([work[0][0]], work[0][1], use_tqdm=False)[0]
    assert again.error is None and len(again.outputs[0].token_ids) == work[0][1].max_tokens


def test_a_culprit_inside_a_multi_step_plan_fails_alone(llm, monkeypatch):
    """num_scheduler_steps=4: the poisoned request raises at step 1 of a decode plan (every
    request wrote step 0's KV and sampled its token); it fails alone with the one token of its
    prefill, the others keep the tokens of a fault-free run with the same K."""
    work = late_poison(llm)
    many = LLM("tiny-qwen3-moe", dtype="float32", block_size=4, num_scheduler_steps=4)
    try:
        expected = run(many, skip_poison=True, work=work)
        assert all(POISON not in o.outputs[0].token_ids for o in expected.values())
        poison_the_forward(monkeypatch, many)
        plans = raising_plans(monkeypatch, many)
        bad = poisoned_fails_alone(run(many, work=work), expected, "a kernel failed")
        assert len(bad.outputs[0].token_ids) == 1  # it raised on computing its second token
        assert plans and min(plans) == 4, plans  # ... always inside a 4-step plan, parts too
        sched = many.engine.schedulers[0]
        assert sched.block_manager.num_free_blocks == sched.config.num_blocks
    finally:
        many.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        # the attention worker raises mid-step (last layer, other micro-batch in flight)
        dict(num_attention_workers=2, num_expert_workers=1, num_micro_batches=2),
        # the prefill worker raises on the prompt
        dict(num_prefill_workers=1, num_attention_workers=1, num_expert_workers=1),
    ],
    ids=["2A1F-m2", "1P1A1F"],
)
def test_a_request_that_makes_a_worker_raise_fails_alone_on_a_cluster(layout, monkeypatch):
    monkeypatch.setenv(FAULT_TOKEN_ENV, str(POISON))  # read by the spawned workers only
    llm = LLM("tiny-qwen3-moe", dtype="float32", block_size=4, **layout)
    ex = llm.engine.executor
    try:
        expected = run(llm, skip_poison=True)
        assert all(o.error is None for o in expected.values())
        poisoned_fails_alone(run(llm), expected, "injected fault")
        # the workers stayed up: every failure was a re-formed data plane, no replacement
        assert llm.engine.failure_stats()["worker_restarts"] == {}
        recoveries = llm.engine.failure_stats()["recovery_seconds"]
        print(f"{len(recoveries)} re-forms, {sum(recoveries):.2f} s in all")
        assert ex.health() == (True, "ok")
    finally:
        llm.shutdown()
    assert_cleaned_up(ex)


def kill_during_isolation(monkeypatch, llm: LLM, role: str) -> list:
    """While the engine bisects a step, SIGKILL a worker of `role` (attention: the one that
    holds the poisoned request) just before the first part that is one innocent request runs:
    the part must not be blamed for the loss. Returns [the killed worker] once killed."""
    eng = llm.engine
    sup = eng.executor.supervisor
    run_part, isolate = eng.runner._run, eng.runner._isolate
    killed: list = []
    bisecting = [False]

    def isolating(*args):
        bisecting[0] = True
        try:
            return isolate(*args)
        finally:
            bisecting[0] = False

    def part(plan):
        seqs = [s for b in [*plan.batches, *plan.prefill] for s in b.seqs]
        seqs += [t.seq for t in plan.transfers]
        ids = {s.request_id for s in seqs}
        if bisecting[0] and not killed and len(ids) == 1 and not poisoned(seqs[0]):
            if role == "attention":
                bad = next(r for r, s in eng.requests.items() if poisoned(s.seqs[0]))
                rank = eng.scheduler.replica_of[bad][0]
            else:
                rank = next(w.rank for w in sup.workers if w.role == role)
            victim = next(w for w in sup.workers if w.role == role and w.rank == rank)
            os.kill(victim.process.pid, signal.SIGKILL)  # the supervisor reaps it
            killed.append(victim)
        return run_part(plan)

    monkeypatch.setattr(eng.runner, "_isolate", isolating)
    monkeypatch.setattr(eng.runner, "_run", part)
    return killed


@pytest.fixture(scope="module")
def poisoned_cluster():
    """A 2A1F m=2 cluster running up to 3 decode steps per plan whose attention workers raise
    on POISON, and its fault-free run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_TOKEN_ENV, str(POISON))  # read by the spawned workers (replacements too)
        llm = LLM("tiny-qwen3-moe", dtype="float32", block_size=4, num_attention_workers=2,
                  num_expert_workers=1, num_micro_batches=2, num_scheduler_steps=3)  # fmt: skip
        ex = llm.engine.executor
        try:
            expected = run(llm, skip_poison=True)
            assert all(o.error is None for o in expected.values())
            yield llm, expected
        finally:
            llm.shutdown()
    assert_cleaned_up(ex)


@pytest.mark.slow
@pytest.mark.parametrize("role", ["expert", "attention"])
def test_a_worker_lost_while_bisecting(poisoned_cluster, role, monkeypatch, caplog):
    """A worker SIGKILLed in the middle of a bisection (before a part of one innocent request):
    that part is not blamed, the worker is replaced, the rest of the step is replayed whole
    and bisected again; the poisoned request fails alone, the others keep their tokens."""
    llm, expected = poisoned_cluster
    before = llm.engine.failure_stats()["worker_restarts"].get(role, 0)
    killed = kill_during_isolation(monkeypatch, llm, role)
    poisoned_fails_alone(run(llm), dict(expected), "injected fault")
    assert len(killed) == 1 and killed[0].process.exitcode == -signal.SIGKILL, killed
    assert llm.engine.failure_stats()["worker_restarts"].get(role, 0) == before + 1
    bisections = [r for r in caplog.records if "isolating the request(s)" in r.message]
    assert len(bisections) == 2, "the step was not bisected again after the loss"
    assert llm.engine.executor.health() == (True, "ok")


@pytest.mark.slow
def test_a_culprit_inside_a_multi_step_plan_on_a_cluster(poisoned_cluster, llm, monkeypatch):
    """The attention worker raises at step 1 of a 3-step plan (mid ping-pong, the expert
    worker in lockstep): the poisoned request fails alone, the others keep the fault-free
    tokens of the same K, and no worker was replaced."""
    cluster, expected = poisoned_cluster
    work = late_poison(llm)
    restarts = cluster.engine.failure_stats()["worker_restarts"]
    plans = raising_plans(monkeypatch, cluster)
    bad = poisoned_fails_alone(run(cluster, work=work), dict(expected), "injected fault")
    assert len(bad.outputs[0].token_ids) == 1
    assert plans and min(plans) == 3, plans
    assert cluster.engine.failure_stats()["worker_restarts"] == restarts
    assert cluster.engine.executor.health() == (True, "ok")


def hold_prefill_during_replay(monkeypatch, llm: LLM) -> dict:
    """The replay that sends again a prefill plan that raised once runs with its prefill worker
    SIGSTOPped (SIGCONT when the replay returns): the decode side finishes first, so the plan's
    second raise comes only in a later step. Counts the held replays, and at each bisection the
    plans' raises and the whole-step raises of its own step (and every execute: the plans'
    raises, prefill and decode sequences)."""
    eng = llm.engine
    sup = eng.executor.supervisor
    runner = eng.runner
    run_part, isolate = runner._run, runner._isolate
    seen = {"held": 0, "raised": 0, "bisections": [], "calls": []}

    def isolating(*args):
        seen["bisections"].append((dict(runner._prefill_raises), seen["raised"]))
        return isolate(*args)

    def part(plan):
        hold = (
            not seen["held"]
            and runner._prefill_raises.get(0) == 1
            and not plan.prefill[0].is_empty
            and any(not b.is_empty for b in plan.batches)
            and not plan.transfers  # none are placed while that worker's plan is in flight
        )
        decode = sum(len(b.seqs) for b in plan.batches)
        seen["calls"].append((dict(runner._prefill_raises), len(plan.prefill[0].seqs), decode))
        worker = next(w for w in sup.workers if w.role == "prefill")
        if hold:
            os.kill(worker.process.pid, signal.SIGSTOP)
            seen["held"] += 1
        try:
            got = run_part(plan)
        except StepInterrupted:
            seen["raised"] += 1
            raise
        finally:
            if hold:
                os.kill(worker.process.pid, signal.SIGCONT)
        seen["raised"] = 0
        return got

    monkeypatch.setattr(runner, "_isolate", isolating)
    monkeypatch.setattr(runner, "_run", part)
    return seen


@pytest.mark.slow
def test_a_prefill_plan_whose_second_raise_comes_after_the_replay(monkeypatch):
    """A poisoned prompt's plan raises, the replay sends it again, and its second raise arrives
    only after that replay finished (its worker held): the raises are counted across steps, so
    the step that sees the second one is bisected at once; the poisoned request fails alone."""
    monkeypatch.setenv(FAULT_TOKEN_ENV, str(POISON))  # read by the spawned workers only
    llm = LLM("tiny-qwen3-moe", dtype="float32", block_size=4, num_prefill_workers=1,
              num_attention_workers=1, num_expert_workers=1)  # fmt: skip
    ex = llm.engine.executor
    # the first wave decodes all along, so that the replay does not wait for the prefill
    work = [(p, sp if i >= FIRST_WAVE else dataclasses.replace(sp, max_tokens=40))
            for i, (p, sp) in enumerate(workload())]  # fmt: skip
    try:
        expected = run(llm, skip_poison=True, work=work)
        seen = hold_prefill_during_replay(monkeypatch, llm)
        poisoned_fails_alone(run(llm, work=work), expected, "injected fault")
        assert seen["held"] == 1, seen["calls"]
        # bisected on the first raise of its step: the one before came in an earlier step
        assert seen["bisections"] == [({0: MAX_FAILED_REPLAYS}, 1)], seen["calls"]
        assert llm.engine.failure_stats()["worker_restarts"] == {}
        assert ex.health() == (True, "ok")
    finally:
        llm.shutdown()
    assert_cleaned_up(ex)

"""Failures on a real 1P+2A+2F m=2 cluster (tiny-deepseek-v3): workers SIGKILLed or SIGSTOPped
at random points while 32 requests (greedy and seeded) stream; every request completes with
the token ids of a fault-free run, streams never repeat or drop a token, and nothing is left
behind (processes, /dev/shm segments, IPC folders)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import assert_cleaned_up, greedy_and_seeded, mixed_prompts

from afd import LLM, SamplingParams
from afd.scheduler.cluster.supervisor import WorkerDiedError

pytestmark = pytest.mark.slow

MODEL = "tiny-deepseek-v3"
NUM_REQUESTS = 32
WAVES = 4  # requests arrive in waves, so the prefill worker has work at several points


def workload() -> list[tuple[list[int], SamplingParams]]:
    return greedy_and_seeded(mixed_prompts(NUM_REQUESTS, 512, seed=3), 9, 8, seed=1000)


def run(llm: LLM, kills: dict[int, tuple[str, int]] | None = None) -> tuple[list, list[float]]:
    """Stream the workload; kills maps an engine step to (role, signal) of a worker to hit
    before that step. Returns every request's token ids and the recovery times."""
    eng = llm.engine
    work = workload()
    per_wave = NUM_REQUESTS // WAVES
    ids: dict[str, int] = {}
    seen: dict[str, list[int]] = {}
    done: dict[int, list[int]] = {}
    kills = dict(kills or {})
    step = 0
    before = len(eng.failure_stats()["recovery_seconds"])
    deadline = time.monotonic() + 240
    while len(done) < NUM_REQUESTS:
        assert time.monotonic() < deadline, "the workload did not finish"
        if step % 3 == 0 and len(ids) < NUM_REQUESTS:
            for p, sp in work[len(ids) : len(ids) + per_wave]:
                ids[eng.add_request(p, sp)] = len(ids)
        if step in kills:
            role, sig = kills.pop(step)
            victim = next(w for w in eng.executor.supervisor.workers if w.role == role)
            os.kill(victim.process.pid, sig)
        for out in eng.step():
            tokens = out.outputs[0].token_ids
            prev = seen.get(out.request_id, [])
            assert tokens[: len(prev)] == prev, "a stream changed tokens it had sent"
            assert out.error is None, out.error
            seen[out.request_id] = tokens
            if out.finished:
                done[ids[out.request_id]] = tokens
        step += 1
    assert not kills, f"the workload ended before the kills at steps {sorted(kills)}"
    return [done[i] for i in range(NUM_REQUESTS)], eng.failure_stats()["recovery_seconds"][before:]


@pytest.fixture(scope="module")
def cluster():
    llm = LLM(MODEL, dtype="float32", block_size=4, num_prefill_workers=1,
              num_attention_workers=2, num_expert_workers=2, num_micro_batches=2,
              worker_timeout_s=5.0)  # fmt: skip
    ex = llm.engine.executor
    try:
        yield llm, run(llm)[0]  # the fault-free run every other run must equal
    finally:
        llm.shutdown()
    assert_cleaned_up(ex)


def test_sigkill_expert_then_attention_then_prefill(cluster, kill_rng):
    llm, expected = cluster
    steps = sorted(kill_rng.sample(range(1, 12), 3))
    kills = dict(zip(steps, [("expert", signal.SIGKILL), ("attention", signal.SIGKILL),
                             ("prefill", signal.SIGKILL)], strict=True))  # fmt: skip
    tokens, recoveries = run(llm, kills)
    print(f"kills before steps {steps}: recovery times {[f'{t:.2f} s' for t in recoveries]}")
    assert tokens == expected
    restarts = llm.engine.failure_stats()["worker_restarts"]
    assert restarts.get("expert", 0) >= 1 and restarts.get("attention", 0) >= 1
    assert restarts.get("prefill", 0) >= 1
    assert llm.engine.executor.health() == (True, "ok")


def test_sigstop_expert_is_replaced(cluster, kill_rng):
    llm, expected = cluster
    step = kill_rng.randrange(1, 10)
    t0 = time.monotonic()
    tokens, recoveries = run(llm, {step: ("expert", signal.SIGSTOP)})
    print(f"SIGSTOP before step {step}: recovery {[f'{t:.2f} s' for t in recoveries]}, "
          f"run {time.monotonic() - t0:.1f} s")  # fmt: skip
    assert tokens == expected
    assert recoveries, "the stopped worker was never replaced"


def test_restart_budget_exhausted_fails_fast(bound):
    """--max-worker-restarts 0: today's behaviour, a clear error naming the worker."""
    llm = LLM("tiny-qwen3-moe", dtype="float32", num_attention_workers=1, num_expert_workers=1,
              max_worker_restarts=0)  # fmt: skip
    ex = llm.engine.executor
    eng = llm.engine
    eng.add_request([5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True))
    eng.step()
    victim = next(w for w in ex.supervisor.workers if w.role == "expert")
    os.kill(victim.process.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match="expert worker 1"):
        for _ in range(10_000):
            eng.step()
    assert time.monotonic() - t0 < bound(10)
    assert ex.health()[0] is False
    llm.shutdown()
    for w in ex.supervisor.workers:
        assert not w.process.is_alive()

"""Every admitted request fits one replica's KV cache, so none is left unscheduled (issue 22)."""

from __future__ import annotations

import pytest

from afd import LLM, SamplingParams
from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
from afd.scheduler.core.sequence import Sequence, SequenceStatus

# 8 blocks of 4 tokens: one replica holds 32 tokens
KV = dict(dtype="float32", block_size=4, num_kv_blocks=8, enable_prefix_caching=False)


def test_max_model_len_above_kv_capacity_is_an_error():
    with pytest.raises(ValueError, match=r"--max-model-len 64 .*capacity of 32 tokens"):
        LLM("tiny-qwen3-moe", max_model_len=64, **KV)


def test_prompt_plus_max_tokens_over_capacity_finishes():
    """The issue's case scaled down: prompt fits the cache, prompt + max_tokens does not. Before,
    it was preempted at the KV limit and never scheduled again (the engine spun); now the
    default max_model_len is the capacity, so it ends at it."""
    llm = LLM("tiny-qwen3-moe", **KV)
    prompt = list(range(5, 33))  # 28 tokens
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eng = llm.engine
    rid = eng.add_request(prompt, params)
    done = {}
    for _ in range(50):  # bounded: the bug was an endless loop
        for o in eng.step():
            done[o.request_id] = o
        if not eng.has_unfinished_requests():
            break
    assert rid in done and done[rid].finished, "left unscheduled"
    assert llm.engine.max_model_len == 32
    assert len(prompt) + len(done[rid].outputs[0].token_ids) == 32
    assert eng.schedulers[0].block_manager.num_free_blocks == 8


def test_offline_generate_over_capacity_names_it():
    """LLM.generate refuses rather than cut the answer at the cache's end (the server 400s)."""
    llm = LLM("tiny-qwen3-moe", **KV)
    params = SamplingParams(temperature=0, max_tokens=10)
    with pytest.raises(ValueError, match=r"= 38 tokens .*KV cache capacity of 32 tokens"):
        llm.generate([list(range(5, 33))], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    (out,) = llm.generate([list(range(5, 27))], params, use_tqdm=False)  # 22 + 10 fits
    assert len(out.outputs[0].token_ids) == 10


def _drive(scheduler: Scheduler, seqs: list[Sequence]) -> int:
    """Run seqs to the end with a fake model (next token = a hash of the tokens so far); every
    step must schedule something while a sequence is unfinished. Returns the steps taken."""
    for seq in seqs:
        scheduler.add(seq)
    steps = 0
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        assert not batch.is_empty, "unfinished sequences left unscheduled"
        sampled = {s.seq_id: (hash(tuple(s.token_ids)) % 97, None) for s in batch.seqs}
        scheduler.update(batch, sampled, eos_token_ids=set())
        steps += 1
        assert steps < 10_000
    return steps


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_at_the_kv_limit_leaves_no_sequence_behind(prefix_caching):
    """8 sequences that each fit the cache alone (prompt 10 + 21 tokens of 32) but not
    together: preempted at the limit, every one finishes with the tokens it gets alone."""
    params = SamplingParams(max_tokens=21, ignore_eos=True)
    prompts = [[i % 3] * 6 + [i, i + 1, i + 2, i + 3] for i in range(8)]  # shared prefixes

    def run(num_blocks: int) -> tuple[list[list[int]], int]:
        config = SchedulerConfig(
            num_blocks, 4, 8, 16, enable_prefix_caching=prefix_caching, max_model_len=32
        )
        scheduler = Scheduler(config)
        seqs = [Sequence(f"r{i}", 0, p, params) for i, p in enumerate(prompts)]
        _drive(scheduler, seqs)
        assert all(s.status == SequenceStatus.FINISHED_LENGTH for s in seqs)
        assert scheduler.block_manager.num_free_blocks == num_blocks
        return [s.output_token_ids for s in seqs], scheduler.num_preemptions

    roomy, none = run(num_blocks=64)
    tight, preemptions = run(num_blocks=8)
    assert none == 0 and preemptions >= 4
    assert tight == roomy


def test_greedy_tokens_under_kv_pressure_equal_the_unpressured_ones():
    """The engine end to end: 4 long greedy requests on a cache that holds one at a time are
    preempted at the KV limit and still all finish with the tokens of a roomy cache."""
    prompts = [[5 + i, 40 + 3 * i, 9, 17 + i, 23, 31 + i, 2, 11] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = LLM("tiny-qwen3-moe", **{**KV, "num_kv_blocks": 64})
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    del roomy
    tight = LLM("tiny-qwen3-moe", **KV)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.schedulers[0].num_preemptions > 0
    assert got == want and all(len(t) == 20 for t in got)


def test_the_server_refuses_prompt_plus_max_tokens_over_capacity_with_a_400():
    from fastapi.testclient import TestClient

    from afd.config import EngineConfig
    from afd.engine.async_engine import AsyncEngine
    from afd.entrypoints.server import build_app

    engine = AsyncEngine(EngineConfig.from_flat(model="tiny-qwen3-moe", **KV))
    with TestClient(build_app(engine)) as client:
        body = {"prompt": list(range(5, 33)), "max_tokens": 10}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        assert "maximum context length is 32 tokens" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={**body, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"

"""Every admitted request fits one replica's KV cache, so none is left unscheduled (issue 22)."""

from __future__ import annotations

import pytest

from afd import LLM, SamplingParams

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

"""Sampling at the edges: every value SamplingParams accepts runs, the rest is refused; a row
whose sampling raises fails alone; seeded draws depend on request state only."""

from __future__ import annotations

import math

import pytest
import torch

from afd import LLM, SamplingParams
from afd.sampling.sampler import Sampler, row_generator


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
        ("top_p", 0.0), ("top_p", math.nan), ("top_p", 1.5), ("min_p", math.nan),
        ("min_p", -0.1), ("top_k", -2), ("top_k", 2**63), ("top_k", 1.5), ("seed", 2**63),
        ("seed", -(2**63) - 1), ("max_tokens", 0), ("max_tokens", 2**64), ("n", 0),
        ("n", True), ("logprobs", 21), ("stop_token_ids", [2**64]), ("stop", [""]),
    ],
)  # fmt: skip
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("temperature", [1e-300, 1e-39, 5e-324, 1e-6, 0.0])
def test_temperatures_that_underflow_sample_greedily(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 30
    sp = SamplingParams(temperature=temperature, seed=1)
    out = Sampler()(logits, [sp] * 3, [row_generator(1, 0, i) for i in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_small_but_usable_temperature_and_huge_top_k_run():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1e-4, top_k=2**62), SamplingParams(top_k=10**9, seed=3),
              SamplingParams(top_p=1e-300), SamplingParams(min_p=1.0)]  # fmt: skip
    out = Sampler()(logits, params, [row_generator(2**63 - 1, 0, 0), None, None, None])
    assert all(0 <= t < 50 for t in out.token_ids)
    assert out.token_ids[2] == int(logits[2].argmax())  # top_p that small keeps one token
    assert out.token_ids[3] == int(logits[3].argmax())  # min_p = 1 keeps the top token only


def test_a_failing_row_fails_alone():
    logits = torch.randn(3, 20)
    logits[1] = math.nan  # e.g. a request that broke its row
    params = [SamplingParams(temperature=0.7, seed=s, logprobs=1) for s in range(3)]
    gens = [row_generator(s, 0, 5) for s in range(3)]
    out = Sampler().sample_isolated(logits, params, gens, names=["a", "b", "c"])
    assert out.token_ids[1] == -1 and set(out.errors) == {1} and "sampling failed" in out.errors[1]
    fresh = [row_generator(0, 0, 5), row_generator(2, 0, 5)]
    alone = Sampler()(logits[[0, 2]], [params[0], params[2]], fresh)
    assert [out.token_ids[0], out.token_ids[2]] == alone.token_ids
    assert out.logprobs[1] == {} and out.logprobs[0]


def test_seeded_draws_depend_on_seed_index_and_position_only():
    a = torch.rand(1, generator=row_generator(7, 1, 30)).item()
    assert a == torch.rand(1, generator=row_generator(7, 1, 30)).item()
    others = [row_generator(8, 1, 30), row_generator(7, 2, 30), row_generator(7, 1, 31)]
    assert all(torch.rand(1, generator=g).item() != a for g in others)
    row_generator(-(2**63), 0, 0), row_generator(2**63 - 1, 0, 0)  # the whole seed range


def test_hostile_values_in_the_single_process_engine():
    """The inputs of issue 10 run (or are refused) without disturbing other requests."""
    llm = LLM("tiny-qwen3-moe", dtype="float32")
    try:
        ok = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        want = llm.generate([[5, 6, 7]], ok)[0].outputs[0].token_ids
        params = [ok] + [SamplingParams(temperature=t, max_tokens=2) for t in (1e-300, 1e-39,
                                                                              5e-324)]  # fmt: skip
        params.append(SamplingParams(top_k=2**63 - 1, max_tokens=2, seed=-5))
        outs = llm.generate([[5, 6, 7]] * len(params), params)
        assert outs[0].outputs[0].token_ids == want
        greedy2 = want[:2]
        assert [o.outputs[0].token_ids for o in outs[1:4]] == [greedy2] * 3
        assert all(o.outputs[0].finish_reason in ("length", "stop") for o in outs)
        with pytest.raises(ValueError, match="n must be at most"):
            llm.engine.add_request([5], SamplingParams(n=10**6))
    finally:
        llm.shutdown()


def test_repetition_penalties_near_zero_or_huge_still_sample():
    """5e-324 is 0 in float32: a repeated token's logit became inf and its row NaN, so the
    request failed (a 500, found by `afd bench fuzz`); every accepted penalty samples."""
    llm = LLM("tiny-qwen3-moe", dtype="float32")
    try:
        params = [SamplingParams(repetition_penalty=p, max_tokens=4, ignore_eos=True, seed=1)
                  for p in (5e-324, 1e-300, 1e-38, 1e300)]  # fmt: skip
        outs = llm.generate([[5, 6, 7, 5, 6]] * len(params), params, use_tqdm=False)
        assert [o.outputs[0].finish_reason for o in outs] == ["length"] * len(params)
    finally:
        llm.shutdown()


def test_a_request_whose_sampling_raises_fails_alone(monkeypatch):
    """Second line of isolation: whatever slips past validation and makes the sampler raise
    fails only the request whose row raised (finish_reason "abort", an error), never the step."""
    llm = LLM("tiny-qwen3-moe", dtype="float32")
    try:
        ok = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        want = llm.generate([[5, 6, 7]], ok)[0].outputs[0].token_ids
        real = Sampler.__call__

        def poisoned(self, logits, params, *rest):
            if any(p.seed == 666 for p in params):
                raise RuntimeError("poisoned row")
            return real(self, logits, params, *rest)

        monkeypatch.setattr(Sampler, "__call__", poisoned)
        bad = SamplingParams(temperature=0.5, seed=666, max_tokens=6)
        outs = llm.generate([[5, 6, 7], [5, 6, 7]], [ok, bad])
        assert outs[0].error is None and outs[0].outputs[0].token_ids == want
        assert outs[1].finished and "poisoned row" in outs[1].error
        assert outs[1].outputs[0].finish_reason == "abort"
        bm = llm.engine.schedulers[0].block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.shutdown()

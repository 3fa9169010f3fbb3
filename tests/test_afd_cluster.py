"""Disaggregated decode across real processes: same tokens as the single-process engine and
logprobs within 1e-3 of transformers (fp32), over the shm transport (what "auto" picks on one CPU
host) and over gloo (the torch transport)."""

from __future__ import annotations

import os

import pytest
from conftest import hf_rows, mixed_prompts

from afd import LLM, SamplingParams
from afd.builtin import resolve_model
from afd.config import ModelConfig

pytestmark = pytest.mark.slow

TOPOLOGIES = {
    "tiny-qwen3-moe": [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)],
    "tiny-deepseek-v3": [(1, 1), (2, 2), (3, 2)],
}
CASES = [(model, 0, a, f, "auto") for model, topos in TOPOLOGIES.items() for a, f in topos]
# P/D: a prefill pool runs the prompts and ships their KV to the attention workers.
CASES += [("tiny-qwen3-moe", 1, 1, 1, "auto"), ("tiny-deepseek-v3", 2, 2, 2, "auto")]
CASES += [("tiny-qwen3-moe", 0, 2, 2, "torch"), ("tiny-deepseek-v3", 1, 3, 2, "torch")]


@pytest.fixture(scope="module")
def reference():
    """Per model: prompts, the single-process engine's tokens, and transformers' log-softmax rows
    over prompt + those tokens (whose argmax must be those tokens)."""
    cache = {}

    def get(model):
        if model not in cache:
            prompts = mixed_prompts(6, 512, seed=1)
            llm = LLM(model, dtype="float32", block_size=4)
            tokens = [t for t, _ in run_continuous(llm, prompts)]
            seqs = [p + t for p, t in zip(prompts, tokens, strict=True)]
            rows = hf_rows(resolve_model(model), seqs)
            for p, t, row in zip(prompts, tokens, rows, strict=True):
                assert row[len(p) - 1 : -1].argmax(-1).tolist() == t, "not transformers' tokens"
            cache[model] = (prompts, tokens, rows)
        return cache[model]

    return get


def assert_matches(got, prompts, tokens, rows, what: str) -> None:
    """Tokens equal the reference's; each one's logprob within 1e-3 of transformers'."""
    for i, ((ids, lps), p, want, row) in enumerate(zip(got, prompts, tokens, rows, strict=True)):
        assert ids == want, f"{what}: prompt {i}"
        for j, (tok, lp) in enumerate(zip(ids, lps, strict=True)):
            ref = float(row[len(p) - 1 + j, tok])
            got_lp = lp[tok].logprob
            assert abs(got_lp - ref) < 1e-3, f"{what}: prompt {i} token {j}: {got_lp} vs {ref}"


def run_continuous(llm, prompts):
    """Requests join while others decode and finish at different lengths."""
    eng = llm.engine
    ids, done = {}, {}
    params = [
        SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True, logprobs=1)
        for i in range(len(prompts))
    ]
    for i in range(2):
        ids[eng.add_request(prompts[i], params[i])] = i
    step = 0
    while eng.has_unfinished_requests() or len(ids) < len(prompts):
        if step % 3 == 2 and len(ids) < len(prompts):
            i = len(ids)
            ids[eng.add_request(prompts[i], params[i])] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.request_id]] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
        step += 1
    return [done[i] for i in range(len(prompts))]


def cluster(model: str, p: int, a: int, f: int, dtype: str = "float32", **kw) -> LLM:
    return LLM(
        model,
        dtype=dtype,
        block_size=4,
        num_prefill_workers=p,
        num_attention_workers=a,
        num_expert_workers=f,
        **kw,
    )


@pytest.mark.parametrize("model,p,a,f,comm", CASES)
def test_topology_matches_single_process(reference, model, p, a, f, comm):
    prompts, tokens, rows = reference(model)
    llm = cluster(model, p, a, f, comm_backend=comm)
    try:
        for m in (1, 2, 3):
            llm.engine.executor.num_micro_batches = m
            assert_matches(run_continuous(llm, prompts), prompts, tokens, rows, f"m={m}")
            blocks = [
                s.block_manager for s in llm.engine.schedulers + llm.engine.prefill_schedulers
            ]
            assert all(bm.num_free_blocks == bm.num_blocks for bm in blocks), "leaked KV blocks"
        # An attention worker holds no routed expert; expert shards add up to all experts once.
        ex = llm.engine.executor
        cfg = llm.engine.model_config
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4 * len(cfg.moe_layers)
        expert_bytes = [v for (role, _), v in ex.param_bytes.items() if role == "expert"]
        assert sum(expert_bytes) == per_expert * cfg.n_routed_experts
        assert max(expert_bytes) - min(expert_bytes) <= per_expert
    finally:
        llm.shutdown()
    for w in ex.supervisor.workers:
        assert not w.process.is_alive()
    assert ex.layout.shm and not os.path.exists(ex.layout.shm), "shm segments left behind"


@pytest.mark.parametrize(
    "model,p,a,f", [("tiny-deepseek-v3", 0, 3, 2), ("tiny-qwen3-moe", 1, 2, 1)]
)
def test_multi_step_plans_match_single_process(reference, model, p, a, f):
    """num_scheduler_steps=3: attention workers feed their sampled tokens back and run the
    micro-batch pipeline on across the steps of a plan; experts follow in lockstep."""
    prompts, tokens, rows = reference(model)
    llm = cluster(model, p, a, f, num_scheduler_steps=3)
    ex = llm.engine.executor
    steps_run = []
    execute = ex._execute

    def spy(*args):
        out = execute(*args)
        steps_run.append(ex.last.num_steps)
        return out

    ex._execute = spy
    try:
        for m in (1, 2, 3):
            ex.num_micro_batches = m
            steps_run.clear()
            assert_matches(run_continuous(llm, prompts), prompts, tokens, rows, f"m={m}")
            assert 3 in steps_run, f"m={m}: no multi-step plan ran"
            blocks = [
                s.block_manager for s in llm.engine.schedulers + llm.engine.prefill_schedulers
            ]
            assert all(bm.num_free_blocks == bm.num_blocks for bm in blocks), "leaked KV blocks"
    finally:
        llm.shutdown()


def test_decode_keeps_going_while_a_long_prompt_prefills():
    llm = LLM("tiny-qwen3-moe", dtype="float32", num_prefill_workers=1, num_attention_workers=1,
              num_expert_workers=1, max_num_batched_tokens=2048)  # fmt: skip
    eng = llm.engine
    try:
        short = eng.add_request(
            [5, 6, 7], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        )
        while not any(s.running for s in eng.schedulers):
            eng.step()
        long_prompt = [(7 * i) % 500 + 3 for i in range(2000)]
        eng.add_request(long_prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        progressed_during_prefill = 0
        router = eng.scheduler.router
        for _ in range(2000):
            busy = bool(router.inflight)
            outs = eng.step()
            if busy and any(o.request_id == short for o in outs):
                progressed_during_prefill += 1
            if not router.inflight and not eng.prefill_schedulers[0].has_unfinished and busy:
                break
        assert progressed_during_prefill >= 3, "decode waited for the long prefill"
    finally:
        llm.shutdown()


def test_fp8_dispatch_serves_with_about_half_the_bytes():
    """2A2F in bfloat16: --dispatch-dtype fp8 sends e4m3 rows + a float32 scale per 128 channels
    (DeepEP's format); the A->F bytes drop to about half, combine stays in bfloat16."""
    prompts = mixed_prompts(4, 512, seed=7)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    wire = {}
    for dd in ("auto", "fp8"):
        llm = cluster("tiny-qwen3-moe", 0, 2, 2, "bfloat16", num_micro_batches=2, dispatch_dtype=dd)
        try:
            outs = llm.generate(prompts, params)
            assert [len(o.outputs[0].token_ids) for o in outs] == [5] * len(prompts)
            wire[dd] = {k: v for k, v in llm.engine.stats().items() if k.endswith("_bytes_total")}
        finally:
            llm.shutdown()
    # the same rows go out and come back (which rows depends on the routing, and FP8 rounding
    # changes the routing): per row, combine carries H bfloat16 values, dispatch H values in the
    # dispatch dtype plus k ids and k weights (int32) and, for FP8, one float32 scale
    cfg = ModelConfig.from_pretrained(resolve_model("tiny-qwen3-moe"))
    h, k = cfg.hidden_size, cfg.num_experts_per_tok
    per_row = {dd: w["dispatch_bytes_total"] / w["combine_bytes_total"] for dd, w in wire.items()}
    assert per_row["auto"] == (2 * h + 2 * k * 4) / (2 * h)
    assert per_row["fp8"] == (h + (2 * k + 1) * 4) / (2 * h)
    assert 0.5 < per_row["fp8"] / per_row["auto"] < 0.6  # hidden 64: ids and weights weigh in

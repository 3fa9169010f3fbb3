"""The single-process engine against transformers, under every scheduling situation."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, mixed_prompts

from afd import LLM, SamplingParams
from afd.builtin import resolve_model

NEW = 32


@pytest.fixture(
    scope="module",
    params=["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-deepseek-v2", "tiny-deepseek-v3"],
)
def family(request):
    path = resolve_model(request.param)
    prompts = mixed_prompts(8, 512)
    return request.param, prompts, hf_greedy(path, prompts, NEW)


def greedy(logprobs=None):
    return SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=logprobs)


def check(outs, ref, check_logprobs=False):
    ref_tokens, ref_lps = ref
    for i, out in enumerate(outs):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens[i], f"prompt {i}"
        assert got.finish_reason == "length"
        if check_logprobs:
            for step, lp in enumerate(got.logprobs):
                tok = ref_tokens[i][step]
                assert abs(lp[tok] - float(ref_lps[i][step][tok])) < 1e-3


def test_batch_matches_transformers(family):
    name, prompts, ref = family
    llm = LLM(name, dtype="float32", block_size=4)
    check(llm.generate(prompts, greedy(logprobs=2)), ref, check_logprobs=True)
    # Same prompts again: prefix cache hits, same tokens.
    bm = llm.engine.schedulers[0].block_manager
    assert bm.hash_to_block, "prefix cache is empty"
    outs = llm.generate(prompts, greedy())
    check(outs, ref)


def test_chunked_prefill_awkward_budget(family):
    name, prompts, ref = family
    llm = LLM(
        name, dtype="float32", block_size=4, max_num_batched_tokens=7, enable_prefix_caching=False
    )
    check(llm.generate(prompts, greedy()), ref)


def test_requests_join_while_others_decode(family):
    name, prompts, ref = family
    llm = LLM(name, dtype="float32", block_size=4)
    eng = llm.engine
    done = {}
    ids = {}
    for i in range(3):
        ids[eng.add_request(prompts[i], greedy())] = i
    steps = 0
    while eng.has_unfinished_requests() or len(ids) < len(prompts):
        if steps % 5 == 4 and len(ids) < len(prompts):
            i = len(ids)
            ids[eng.add_request(prompts[i], greedy())] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.request_id]] = out
        steps += 1
    check([done[i] for i in range(len(prompts))], ref)


def test_preemption_recomputes_and_matches(family):
    name, prompts, ref = family
    # 30 blocks of 4 tokens cannot hold 8 sequences of up to 57 tokens: preemption must happen.
    llm = LLM(name, dtype="float32", block_size=4, num_kv_blocks=30)
    preempted = []
    sched = llm.engine.schedulers[0]
    original = sched._preempt

    def spy(seq):
        preempted.append(seq.seq_id)
        original(seq)

    sched._preempt = spy
    check(llm.generate(prompts, greedy()), ref)
    assert preempted, "no preemption happened"
    assert sched.block_manager.num_free_blocks == 30


def test_abort_frees_blocks():
    llm = LLM(
        "tiny-qwen3-moe",
        dtype="float32",
        block_size=4,
        num_kv_blocks=64,
        enable_prefix_caching=False,
    )
    eng = llm.engine
    rid = eng.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=50, ignore_eos=True))
    other = eng.add_request([9, 8, 7], greedy())
    for _ in range(3):
        eng.step()
    assert eng.schedulers[0].block_manager.num_free_blocks < 64
    eng.abort_request(rid)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert rid not in outs and outs[other].finished
    assert eng.schedulers[0].block_manager.num_free_blocks == 64


def test_sampling_options_and_stops():
    llm = LLM("tiny-qwen3-moe", dtype="float32")
    p = [5, 6, 7, 8]
    a = llm.generate(
        [p], SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=12)
    )[0]
    b = llm.generate(
        [p], SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=12)
    )[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    many = llm.generate([p], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8))[0]
    assert len(many.outputs) == 3 and all(len(o.token_ids) == 8 for o in many.outputs)
    g = llm.generate([p], greedy())[0].outputs[0]
    stop_tok = g.token_ids[5]
    s = llm.generate([p], SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[stop_tok]))[
        0
    ]
    assert s.outputs[0].token_ids == g.token_ids[: g.token_ids.index(stop_tok) + 1]
    assert s.outputs[0].finish_reason == "stop"
    text = g.text
    if len(text) > 6:
        stop = text[3:6]
        t = llm.generate([p], SamplingParams(temperature=0, max_tokens=NEW, stop=[stop]))[
            0
        ].outputs[0]
        assert t.finish_reason == "stop" and t.text == text[: text.find(stop)]


def test_unstreamed_requests_report_once_with_the_same_text():
    """stream=False: step() returns a request only when it finishes, text decoded once at the end,
    identical to the streamed request's text; stop strings still cut it."""
    llm = LLM("tiny-qwen3-moe", dtype="float32")
    eng = llm.engine
    prompts = ["Hello there", "The quick brown fox", [5, 6, 7, 8]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    streamed = {eng.add_request(p, params): i for i, p in enumerate(prompts)}
    quiet = {eng.add_request(p, params, stream=False): i for i, p in enumerate(prompts)}
    texts: dict[tuple[str, int], str] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id in quiet:
                assert out.finished, "an unstreamed request was reported before it finished"
                texts["quiet", quiet[out.request_id]] = out.outputs[0].text
            elif out.finished:
                texts["streamed", streamed[out.request_id]] = out.outputs[0].text
    assert len(texts) == 6
    for i in range(len(prompts)):
        assert texts["quiet", i] == texts["streamed", i] and texts["quiet", i]
    full = texts["streamed", 0]
    if len(full) > 4:
        stop = full[2:4]
        rid = eng.add_request(prompts[0], SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                              stream=False)  # fmt: skip
        outs = []
        while eng.has_unfinished_requests():
            outs += [o for o in eng.step() if o.request_id == rid]
        assert len(outs) == 1 and outs[0].outputs[0].text == full[: full.find(stop)]


def test_min_p_and_top_k_one_equal_greedy():
    llm = LLM("tiny-deepseek-v3", dtype="float32")
    p = [11, 12, 13]
    g = llm.generate([p], greedy())[0].outputs[0].token_ids
    k1 = llm.generate(
        [p], SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=NEW, ignore_eos=True)
    )
    assert k1[0].outputs[0].token_ids == g
    m = llm.generate(
        [p], SamplingParams(temperature=0.8, min_p=1.0, seed=3, max_tokens=NEW, ignore_eos=True)
    )
    assert m[0].outputs[0].token_ids == g


def test_invalid_input_is_a_clear_error():
    llm = LLM("tiny-qwen3-moe", dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="at most"):
        llm.generate([[5] * 100], greedy())
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 100000]], greedy())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="neither a directory"):
        LLM("no-such-model")
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_triton_kernels_give_the_same_greedy_tokens(model):
    """Triton kernels (interpreted on CPU) against the torch kernels through the whole engine."""
    from afd.kernels import ops

    pytest.importorskip("triton")
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20] * 9]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    tokens = {}
    try:
        for backend in ("torch", "triton"):
            llm = LLM(model, dtype="float32", block_size=4, kernel_backend=backend)
            tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        ops.set_kernel_backend("auto")
    assert tokens["torch"] == tokens["triton"]


def test_routing_prefers_the_replica_with_the_cached_prefix():
    from afd.scheduler.scheduler import Scheduler, SchedulerConfig
    from afd.scheduler.sequence import Sequence

    from afd.engine import LLMEngine

    replicas = [Scheduler(SchedulerConfig(num_blocks=16, block_size=4)) for _ in range(3)]
    warm = Sequence("warm", 0, list(range(10, 22)), greedy())
    replicas[2].add(warm)
    batch = replicas[2].schedule()
    replicas[2].update(batch, {}, set())  # prompt computed, its full blocks published
    fresh = Sequence("new", 0, list(range(10, 22)) + [5, 6], greedy())
    assert LLMEngine._pick_replica(replicas, fresh) == 2
    other = Sequence("other", 0, [7] * 14, greedy())
    assert LLMEngine._pick_replica(replicas, other) in (0, 1)  # more free blocks there

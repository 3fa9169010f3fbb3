"""The single-process engine against transformers, under every scheduling situation."""

from __future__ import annotations

import pytest
import torch
from conftest import check_bf16_logprobs, hf_greedy, hf_rows, mixed_prompts

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


def greedy(logprobs=1):
    return SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True, logprobs=logprobs)


def check(outs, ref):
    """transformers' greedy tokens, and each token's logprob within 1e-3 of its."""
    ref_tokens, ref_lps = ref
    for i, out in enumerate(outs):
        got = out.outputs[0]
        assert got.token_ids == ref_tokens[i], f"prompt {i}"
        assert got.finish_reason == "length"
        assert len(got.logprobs) == len(ref_tokens[i])
        for step, lp in enumerate(got.logprobs):
            tok = ref_tokens[i][step]
            assert abs(lp[tok].logprob - float(ref_lps[i][step][tok])) < 1e-3, (i, step)


def test_batch_matches_transformers(family):
    name, prompts, ref = family
    llm = LLM(name, dtype="float32", block_size=4)
    check(llm.generate(prompts, greedy(logprobs=2)), ref)
    # Same prompts again: prefix cache hits, same tokens.
    bm = llm.engine.schedulers[0].block_manager
    assert bm.hash_to_block, "prefix cache is empty"
    outs = llm.generate(prompts, greedy())
    check(outs, ref)


def test_bfloat16_matches_transformers_within_bf16_error(family):
    """The engine in bf16 (torch kernels on CPU) against transformers in fp32, on the engine's
    own greedy tokens; the bounds scale with transformers' own bf16 error (conftest)."""
    name, prompts, _ = family
    path = resolve_model(name)
    outs = LLM(name, dtype="bfloat16", block_size=4).generate(prompts, greedy(logprobs=1))
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs, strict=True)]
    stats = check_bf16_logprobs(
        prompts, outs, hf_rows(path, seqs), hf_rows(path, seqs, dtype=torch.bfloat16)
    )
    assert stats["mean"] > 0  # bf16 really ran: fp32 would agree to ~1e-6


def test_chunked_prefill_awkward_budget(family):
    name, prompts, ref = family
    llm = LLM(
        name, dtype="float32", block_size=4, max_num_batched_tokens=7, enable_prefix_caching=False
    )
    check(llm.generate(prompts, greedy()), ref)


def test_requests_join_while_others_decode(family):
    name, prompts, ref = family
    llm = LLM(name, dtype="float32", block_size=4)
    check(run_joining(llm.engine, prompts), ref)


def run_joining(eng, prompts) -> list:
    """Three requests first, then one more every fifth step; outputs in prompt order."""
    done, ids = {}, {}
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
    return [done[i] for i in range(len(prompts))]


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
    many = llm.generate(
        [p], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True)
    )[0]
    assert len(many.outputs) == 3 and all(len(o.token_ids) == 8 for o in many.outputs)
    # each sequence draws from its own (seed, index, position) stream
    assert len({tuple(o.token_ids) for o in many.outputs}) == 3
    g = llm.generate([p], greedy())[0].outputs[0]
    stop_tok = g.token_ids[5]
    s = llm.generate([p], SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[stop_tok]))[
        0
    ]
    assert s.outputs[0].token_ids == g.token_ids[: g.token_ids.index(stop_tok) + 1]
    assert s.outputs[0].finish_reason == "stop"
    text = g.text
    assert len(text) > 6, f"the model's greedy text {text!r} is too short for a stop string"
    stop = text[3:6]
    t = llm.generate([p], SamplingParams(temperature=0, max_tokens=NEW, stop=[stop]))[0].outputs[0]
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
    assert len(full) > 4, f"the model's greedy text {full!r} is too short for a stop string"
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


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_triton_kernels_give_the_same_greedy_tokens(model):
    """Triton kernels (interpreted on CPU) against the torch kernels through the whole engine."""
    from afd.kernels import ops

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
    from afd.engine.engine_scheduler import pick_replica
    from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
    from afd.scheduler.core.sequence import Sequence

    replicas = [Scheduler(SchedulerConfig(num_blocks=16, block_size=4)) for _ in range(3)]
    warm = Sequence("warm", 0, list(range(10, 22)), greedy())
    replicas[2].add(warm)
    batch = replicas[2].schedule()
    replicas[2].update(batch, {}, set())  # prompt computed, its full blocks published
    fresh = Sequence("new", 0, list(range(10, 22)) + [5, 6], greedy())
    assert pick_replica(replicas, fresh) == 2
    other = Sequence("other", 0, [7] * 14, greedy())
    assert pick_replica(replicas, other) in (0, 1)  # more free blocks there


def spy_decode_steps(llm) -> list[int]:
    """Records the number of decode steps every multi-step batch reserved."""
    taken: list[int] = []
    for sched in llm.engine.schedulers:
        original = sched.reserve_decode_steps

        def spy(batch, k, original=original):
            taken.append(k)
            original(batch, k)

        sched.reserve_decode_steps = spy
    return taken


def test_multi_step_scheduling_matches_transformers(family):
    """num_scheduler_steps=4: pure-decode batches run four steps per plan, feeding each sampled
    token back, while requests keep joining (their prefill steps run one step)."""
    name, prompts, ref = family
    llm = LLM(name, dtype="float32", block_size=4, num_scheduler_steps=4)
    taken = spy_decode_steps(llm)
    check(run_joining(llm.engine, prompts), ref)
    assert 4 in taken
    bm = llm.engine.schedulers[0].block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_multi_step_stops_seeds_and_limits_match_single_steps():
    """Stops inside a multi-step batch drop the later tokens; seeded sampling, n > 1, stop
    strings, max_tokens and max_model_len give what one step at a time gives."""
    kw = dict(dtype="float32", block_size=4, max_model_len=40)
    one = LLM("tiny-qwen3-moe", **kw)
    prompt = [5, 6, 7, 8]
    g = one.generate([prompt], greedy())[0].outputs[0]
    cases = [
        (prompt, SamplingParams(temperature=1.0, top_p=0.9, seed=7, n=2, max_tokens=11)),
        (prompt, SamplingParams(temperature=0, max_tokens=NEW, stop_token_ids=[g.token_ids[5]])),
        (prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)),
        ([9] * 33, SamplingParams(temperature=0, ignore_eos=True, max_tokens=None)),
    ]
    assert len(g.text) > 6, f"the model's greedy text {g.text!r} is too short for a stop string"
    cases.append((prompt, SamplingParams(temperature=0, max_tokens=NEW, stop=[g.text[3:6]])))
    prompts, params = [c[0] for c in cases], [c[1] for c in cases]
    expected = one.generate(prompts, params)
    many = LLM("tiny-qwen3-moe", num_scheduler_steps=3, **kw)
    taken = spy_decode_steps(many)
    got = many.generate(prompts, params)
    assert 3 in taken
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a.outputs, b.outputs, strict=True):
            assert (y.token_ids, y.text, y.finish_reason) == (x.token_ids, x.text, x.finish_reason)
    assert len(got[3].outputs[0].token_ids) == 40 - 33  # stopped at max_model_len
    bm = many.engine.schedulers[0].block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_max_decode_steps_respects_blocks_limits_and_prefill():
    from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
    from afd.scheduler.core.sequence import Sequence

    sched = Scheduler(SchedulerConfig(num_blocks=6, block_size=4, max_model_len=16))
    a = Sequence("a", 0, [5] * 7, greedy())
    sched.add(a)
    prefill = sched.schedule()
    assert sched.max_decode_steps(prefill, 8) == 1  # a prompt runs one step
    sched.update(prefill, {a.seq_id: (9, None)}, set())
    decode = sched.schedule()
    assert decode.is_decode
    # 8 tokens, 7 computed: max_model_len 16 allows 8 more steps, and their 2 blocks are free
    assert sched.max_decode_steps(decode, 8) == 8
    assert sched.max_decode_steps(decode, 3) == 3
    sched.update(decode, {a.seq_id: (9, None)}, set())
    b = Sequence("b", 0, [6] * 3, SamplingParams(max_tokens=2))
    sched.add(b)
    mixed = sched.schedule()
    assert not mixed.is_decode and sched.max_decode_steps(mixed, 8) == 1
    sched.update(mixed, {a.seq_id: (9, None), b.seq_id: (9, None)}, set())
    both = sched.schedule()  # a: 10 tokens in 3 blocks, b: 4 tokens in 1 block, 2 blocks free
    # max_model_len allows a 6 more; 6 steps need 1 + 2 blocks, 5 steps need 1 + 1
    assert sched.max_decode_steps(both, 8) == 5
    sched.reserve_decode_steps(both, 5)
    assert both.num_steps == 5 and sched.block_manager.num_free_blocks == 0
    # only one token left of every max_tokens: one step
    b.sampling_params = SamplingParams(max_tokens=b.num_output_tokens + 1)
    a.sampling_params = SamplingParams(max_tokens=a.num_output_tokens + 1)
    assert sched.max_decode_steps(both, 8) == 1


def test_a_step_that_keeps_failing_fails_its_requests_and_the_engine_goes_on():
    """Failures with no worker to blame (StepInterrupted, nothing lost) are replayed once; the
    second time the step's requests fail alone with an error and later requests run as usual."""
    from afd.scheduler.core.step import StepInterrupted

    llm = LLM("tiny-qwen3-moe", dtype="float32")
    eng = llm.engine
    rid = eng.add_request([5, 6, 7], greedy())
    eng.step()
    real, calls = eng.executor.execute, []

    def flaky(plan):
        calls.append(1)
        if len(calls) <= 2:
            raise StepInterrupted("boom", set(), set())
        return real(plan)

    eng.executor.execute = flaky
    outs = {o.request_id: o for o in eng.step()}
    assert outs[rid].finished and "boom" in outs[rid].error
    assert outs[rid].outputs[0].finish_reason == "abort"
    eng.executor.execute = real
    assert eng.schedulers[0].block_manager.num_free_blocks == eng.schedulers[0].config.num_blocks
    again = llm.generate([[5, 6, 7]], greedy())[0]
    assert again.error is None and len(again.outputs[0].token_ids) == NEW

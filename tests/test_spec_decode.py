"""Speculative decoding (issue 21): the `--speculative-config` / `LLM(speculative_config=)`
setting and its start-up checks; the n-gram drafter; verification lossless in every topology
(greedy tokens equal transformers', seeded sampling the same tokens, rejection sampling keeps
the distribution); per-position semantics (stops, max_tokens, min_tokens, penalties, logprobs,
n > 1); KV rollback; the spec-decode metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import pytest
import torch
from conftest import hf_rows

from afd import LLM, SamplingParams
from afd.attention_nodes.verify import check_draft
from afd.builtin import resolve_model
from afd.config import EngineConfig
from afd.entrypoints.cli import main
from afd.spec import (
    MAX_SPECULATIVE_TOKENS,
    SpeculativeConfig,
    check_speculation,
    parse_speculative_json,
)
from afd.spec.ngram import propose_ngram


def test_ngram_defaults_and_one_lookup_length_sets_the_other():
    spec = SpeculativeConfig("ngram", 3)
    assert (spec.prompt_lookup_max, spec.prompt_lookup_min) == (3, 1)
    only_max = SpeculativeConfig("ngram", 2, prompt_lookup_max=5)
    assert (only_max.prompt_lookup_max, only_max.prompt_lookup_min) == (5, 5)
    only_min = SpeculativeConfig("ngram", 2, prompt_lookup_min=2)
    assert (only_min.prompt_lookup_max, only_min.prompt_lookup_min) == (2, 2)


@pytest.mark.parametrize(
    "values,words",
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": -1}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": 10**9}, "num_speculative_tokens must be in"),
        ({"method": "ngram", "num_speculative_tokens": 2.5}, "must be an integer"),
        ({"method": "ngram", "num_speculative_tokens": True}, "must be an integer"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "unknown method 'eagle'"),
        ({"method": "ngram", "num_speculative_tokens": 2, "foo": 1}, "unknown key(s) foo"),
        ({"num_speculative_tokens": 2}, "method is required"),
        ({"method": "ngram"}, "num_speculative_tokens is required"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_max": 2,
                "prompt_lookup_min": 3,
            },
            "prompt_lookup_min (3) > prompt_lookup_max (2)",
        ),
        ({"method": "mtp", "num_speculative_tokens": 1, "prompt_lookup_max": 2}, "ngram only"),
    ],
)
def test_bad_configs_are_value_errors_naming_the_key(values, words):
    with pytest.raises(ValueError, match="speculative_config") as e:
        SpeculativeConfig.from_dict(values)
    assert words in str(e.value)
    with pytest.raises(ValueError) as e2:  # LLM(...)'s keywords take the same path
        EngineConfig.from_flat(speculative_config=values)
    assert words in str(e2.value)


def test_llm_keyword_and_json_flag_give_the_same_config():
    values = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    from_dict = EngineConfig.from_flat(speculative_config=values).limits.speculative_config
    assert from_dict == parse_speculative_json(json.dumps(values))
    assert from_dict == SpeculativeConfig("ngram", 4, 3, 3)
    assert EngineConfig.from_flat().limits.speculative_config is None
    assert parse_speculative_json("null") is None
    assert MAX_SPECULATIVE_TOKENS >= 8


@pytest.mark.parametrize(
    "text,words",
    [
        ("{bad", "--speculative-config is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
        ('{"method": "x", "num_speculative_tokens": 1}', "unknown method"),
    ],
)
def test_bad_flag_is_a_one_line_error_exit_2(text, words, capsys):
    assert main(["generate", "--speculative-config", text, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("afd: error: ") and err.count("\n") == 1, err
    assert words in err


def test_mtp_without_an_mtp_layer_is_a_start_up_error():
    spec = SpeculativeConfig("mtp", 1)
    without = SimpleNamespace(hf=SimpleNamespace())
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        check_speculation(spec, without)
    check_speculation(None, without)  # speculation off: nothing to check


def test_mtp_is_refused_until_its_drafter_is_wired(capsys):
    """Never accepted and silently ignored: MTP says its drafter is not built yet; n-gram runs."""
    with_layer = SimpleNamespace(hf=SimpleNamespace(num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="drafter is not built"):
        check_speculation(SpeculativeConfig("mtp", 1), with_layer)
    check_speculation(SpeculativeConfig("ngram", 2), SimpleNamespace(hf=SimpleNamespace()))


def test_config_crosses_to_the_engine_core_as_a_declared_record():
    import msgspec

    config = EngineConfig.from_flat(
        speculative_config={"method": "ngram", "num_speculative_tokens": 2}
    )
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=EngineConfig)
    assert back.limits.speculative_config == SpeculativeConfig("ngram", 2)


# ---- the n-gram drafter ------------------------------------------------------------------------

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}
# prompts whose greedy continuation by the tiny random models falls into a loop (two tokens
# taking turns), so that n-gram drafts get accepted; and one that repeats nothing of itself
LOOPING = {
    "tiny-qwen3-moe": [228, 268, 486, 284, 415, 324, 229],
    "tiny-deepseek-v3": [398, 99, 270, 18, 222, 416, 436, 323, 436],
}
REPEATING = LOOPING["tiny-qwen3-moe"]
NOT_REPEATING = [40, 41, 99, 3, 77, 23, 1]


@pytest.mark.parametrize(
    "tokens,k,lo,hi,want",
    [
        ([1, 2, 3, 4, 1, 2, 3], 3, 1, 3, [4, 1, 2]),  # the longest suffix (3) that occurred
        ([5, 1, 2, 9, 1, 2, 7, 1, 2], 2, 2, 3, [7, 1]),  # the most recent occurrence
        ([3, 4, 3, 4, 3, 4, 3], 4, 1, 1, [4, 3, 4, 3]),  # ... with k tokens after it
        ([3, 4, 3, 4, 3], 5, 1, 1, [4, 3, 4, 3]),  # none has: the longest continuation
        ([1, 2, 3, 4, 5], 3, 1, 3, []),  # nothing repeats
        ([9, 2, 3, 8, 2, 3], 4, 3, 3, []),  # only 2 tokens match, 3 asked for
        ([1, 1, 1, 1], 2, 1, 3, [1]),  # the continuation stops at the sequence's end
        ([7], 2, 1, 1, []),
    ],
)
def test_ngram_proposes_what_followed_the_longest_recent_match(tokens, k, lo, hi, want):
    assert propose_ngram(tokens, k, lo, hi) == want


def test_a_draft_in_a_plan_entry_is_checked():
    from afd.comm import wire
    from afd.comm.messages import AttnStep, PlanEntry, SampleSpec

    ok = PlanEntry(1, [3], 4, [0, 1], True, SampleSpec(temperature=0.0), draft=[5, 6])
    back = wire.decode_to_worker(wire.encode(AttnStep(step=0, micro_batches=[[ok]])))
    assert back.micro_batches[0][0].draft == [5, 6]
    too_long = msgspec.structs.replace(ok, draft=[1] * (MAX_SPECULATIVE_TOKENS + 1))
    with pytest.raises(Exception, match="draft"):
        wire.decode_to_worker(wire.encode(AttnStep(step=0, micro_batches=[[too_long]])))
    with pytest.raises(ValueError, match="vocabulary"):
        check_draft(msgspec.structs.replace(ok, draft=[512]), 512)
    with pytest.raises(ValueError, match="does not sample"):
        check_draft(msgspec.structs.replace(ok, sample=False), 512)
    grammar = SampleSpec(temperature=0.0, structured_outputs=("choice", '["a"]'))
    with pytest.raises(ValueError, match="structured outputs"):
        check_draft(msgspec.structs.replace(ok, params=grammar), 512)
    check_draft(ok, 512)


# ---- lossless in one process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    """Per model: (without speculation, with n-gram speculation), one process each."""
    made: dict[str, tuple[LLM, LLM]] = {}

    def get(model: str) -> tuple[LLM, LLM]:
        if model not in made:
            kw = {"dtype": "float32", "block_size": 4}
            made[model] = (LLM(model, **kw), LLM(model, speculative_config=NGRAM, **kw))
        return made[model]

    yield get
    for pair in made.values():
        for llm in pair:
            llm.shutdown()


def spec_counts(llm: LLM) -> dict[str, float]:
    return {k: v for k, v in llm.engine.stats().items() if k.startswith("spec_decode")}


def generate(llm: LLM, prompts, params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_transformers_greedy(model: str, prompts, tokens) -> None:
    """Each token is transformers' argmax after the prompt and the tokens before it (fp32;
    teacher forcing, so an EOS inside the run is compared too)."""
    seqs = [p + t for p, t in zip(prompts, tokens, strict=True)]
    for p, t, row in zip(prompts, tokens, hf_rows(resolve_model(model), seqs), strict=True):
        assert row[len(p) - 1 : -1].argmax(-1).tolist() == t, "not transformers' tokens"


def assert_kv_free(llm: LLM) -> None:
    for s in llm.engine.schedulers:
        assert s.block_manager.num_free_blocks == s.block_manager.num_blocks, "leaked KV blocks"


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_greedy_tokens_equal_transformers_with_drafts_accepted(engines, model):
    _, spec = engines(model)
    prompts, new = [LOOPING[model], NOT_REPEATING], 24
    before = spec_counts(spec)
    outs = generate(spec, prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    assert_transformers_greedy(model, prompts, [o.outputs[0].token_ids for o in outs])
    after = spec_counts(spec)
    drafts = after["spec_decode_num_draft_tokens_total"] - before.get(
        "spec_decode_num_draft_tokens_total", 0
    )
    accepted = after["spec_decode_num_accepted_tokens_total"] - before.get(
        "spec_decode_num_accepted_tokens_total", 0
    )
    assert drafts > 0 and 0 < accepted <= drafts
    assert (
        sum(v for k, v in after.items() if "per_pos" in k)
        == after["spec_decode_num_accepted_tokens_total"]
    )
    assert_kv_free(spec)


def test_seeded_sampling_gives_the_same_tokens_with_and_without_drafts(engines):
    """Each position draws from (seed, index, position): verification samples every position
    as plain decoding would, so a seeded request is reproducible from its state alone."""
    plain, spec = engines("tiny-qwen3-moe")
    params = [SamplingParams(temperature=t, seed=s, max_tokens=20, ignore_eos=True, n=2)
              for t, s in ((0.3, 1), (0.8, 2), (1.5, 3))]  # fmt: skip
    prompts = [REPEATING, NOT_REPEATING, REPEATING]
    a, b = generate(plain, prompts, params), generate(spec, prompts, params)
    for x, y in zip(a, b, strict=True):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]


SEMANTICS = {
    # the stop token is held back past the loop's start: it ends an accepted run
    "stop_token": lambda toks: {"stop_token_ids": [toks[-1]], "min_tokens": 12},
    "max_tokens_mid_run": lambda toks: {"max_tokens": 17},
    "min_tokens_and_eos": lambda toks: {"ignore_eos": False, "min_tokens": 5},
    # mild: a stronger penalty breaks the loop, and with it every draft
    "penalties": lambda toks: {"frequency_penalty": 0.05},
    "repetition_penalty": lambda toks: {"repetition_penalty": 1.05},
    "logit_bias": lambda toks: {"logit_bias": {toks[5]: 5.0, toks[2]: -3.0}},
    "logprobs": lambda toks: {"logprobs": 3},
    "n_seeded": lambda toks: {"n": 3, "temperature": 0.1, "seed": 5},
}


@pytest.mark.parametrize("case", sorted(SEMANTICS))
def test_per_position_semantics_match_plain_decoding(engines, case):
    """Stops inside an accepted run, max_tokens landing mid-run, min_tokens, penalties and bias
    per position, logprobs: the same outputs as without speculation."""
    plain, spec = engines("tiny-qwen3-moe")
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    toks = generate(plain, [REPEATING], base)[0].outputs[0].token_ids
    values = {"temperature": 0, "max_tokens": 24, "ignore_eos": True, **SEMANTICS[case](toks)}
    params = SamplingParams(**values)
    before = spec_counts(spec).get("spec_decode_num_accepted_tokens_total", 0)
    a, b = generate(plain, [REPEATING], params)[0], generate(spec, [REPEATING], params)[0]
    assert spec_counts(spec)["spec_decode_num_accepted_tokens_total"] > before, "no draft accepted"
    assert_same_outputs(a, b)
    assert_kv_free(spec)


def assert_same_outputs(a, b) -> None:
    """Tokens, text, finish and stop reasons equal; logprobs within float noise."""
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert (y.token_ids, y.text, y.finish_reason) == (x.token_ids, x.text, x.finish_reason)
        assert y.stop_reason == x.stop_reason
        for lx, ly in zip(x.logprobs or [], y.logprobs or [], strict=True):
            assert lx.keys() == ly.keys()
            assert all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)


def test_stop_string_inside_an_accepted_run(engines):
    plain, spec = engines("tiny-qwen3-moe")
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    text = generate(plain, [REPEATING], base)[0].outputs[0].text
    for stop in (text[-5:-2], text[10:13]):
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
        assert_same_outputs(generate(plain, [REPEATING], params)[0],
                            generate(spec, [REPEATING], params)[0])  # fmt: skip


# ---- rejection sampling keeps the distribution --------------------------------------------------


class _LogitsAreHidden:
    """A model whose hidden rows are its logits: the sampler's view of chosen distributions."""

    @staticmethod
    def compute_logits(hidden):
        return hidden


def _first_and_second(logits: torch.Tensor, draft: list[int], n: int):
    """n seeded requests, each verifying `draft` over the rows of `logits` ([1 + len(draft), V]):
    the tokens each emits."""
    from afd.attention_nodes.plan_runner import sample_entries
    from afd.attention_nodes.verify import accept
    from afd.comm.messages import PlanEntry, SampleSpec
    from afd.sampling.sampler import Sampler

    entries = [PlanEntry(i, [1], 3, [0], True, SampleSpec(temperature=1.0, seed=i),
                         prompt_len=2, draft=draft) for i in range(n)]  # fmt: skip
    hidden = logits.repeat(n, 1)
    rows = sample_entries(_LogitsAreHidden(), Sampler(), entries, hidden, {})
    return [[s.token for s in run] for run in accept(entries, rows, {})]


def _chi_square_p(tokens: list[int], probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    observed = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * observed.sum()
    return float(chisquare(observed.numpy(), expected.numpy()).pvalue)


def test_rejection_sampling_keeps_the_target_distribution():
    """Every emitted token follows p: the first token with and without a draft, the token after
    an accepted draft; a draft is accepted with probability p(draft)."""
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.8, 0.0], [0.1, 1.2, 0.4, -1.0, 0.6]])
    p0, p1 = logits.softmax(-1)
    n, x = 6000, 3
    plain = [run[0] for run in _first_and_second(logits[:1], [], n)]
    runs = _first_and_second(logits, [x], n)
    assert _chi_square_p(plain, p0) > 1e-3
    assert _chi_square_p([run[0] for run in runs], p0) > 1e-3
    after = [run[1] for run in runs if len(run) == 2]
    assert all(run[0] == x for run in runs if len(run) == 2)
    assert abs(len(after) / n - float(p0[x])) < 4 * (float(p0[x]) / n) ** 0.5 + 0.01
    assert _chi_square_p(after, p1) > 1e-3
    # an always-accepting verifier would fail the first check
    assert _chi_square_p([x] * n, p0) < 1e-6


# ---- KV rollback, limits, where speculation is off -----------------------------------------------


def test_rejected_drafts_give_back_their_blocks_and_never_reach_the_prefix_cache():
    from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
    from afd.scheduler.core.sequence import Sequence

    spec = SpeculativeConfig("ngram", 3, 2, 1)
    config = SchedulerConfig(num_blocks=16, block_size=2, speculative=spec)
    sched = Scheduler(config)
    seq = Sequence("r", 0, [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=50))
    sched.add(seq)
    prefill = sched.schedule()
    sched.update(prefill, {seq.seq_id: (3, None)}, set())
    batch = sched.schedule()
    assert seq.draft == [1, 2, 3]  # after "2 3": what followed its latest occurrence
    assert len(seq.block_table) == 6  # KV for 8 computed + the last token + 3 drafts
    # the first draft is accepted, the second rejected: 1 accepted + the corrected token 9
    steps = [{seq.seq_id: (1, None)}, {seq.seq_id: (9, None)}]
    sched.update(batch, steps[0], set())
    sched.update(batch.draft_run(steps[1]), steps[1], set())
    sched.settle_drafts(batch, {seq.seq_id: 2})
    assert seq.token_ids[8:] == [3, 1, 9] and seq.num_computed_tokens == 10 and not seq.draft
    assert len(seq.block_table) == 5  # the block of the rejected drafts' KV is free again
    bm = sched.block_manager
    assert bm.num_free_blocks == 16 - 5
    assert len(bm._seq_hashes[seq.seq_id]) == 5  # only blocks of accepted tokens are hashed
    counts = sched.drafter.counts
    assert (counts.num_drafts, counts.num_draft_tokens, counts.num_accepted_tokens) == (1, 3, 1)
    assert counts.accepted_per_pos == [1, 0, 0]


def test_drafts_stop_short_of_max_tokens_and_max_model_len():
    from afd.scheduler.core.scheduler import Scheduler, SchedulerConfig
    from afd.scheduler.core.sequence import Sequence

    spec = SpeculativeConfig("ngram", 8, 1, 1)
    for max_tokens, max_len, want in ((3, 100, 1), (50, 12, 2), (None, 100, 8)):
        sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_model_len=max_len,
                                          speculative=spec))  # fmt: skip
        seq = Sequence("r", 0, [1, 2] * 4, SamplingParams(max_tokens=max_tokens))
        sched.add(seq)
        sched.update(sched.schedule(), {seq.seq_id: (1, None)}, set())
        sched.schedule()
        # one output so far: the last of max_tokens and position max_model_len - 1 stay undrafted
        assert len(seq.draft) == want, (max_tokens, max_len)


def test_a_sequence_whose_drafts_keep_failing_pauses_drafting():
    from afd.spec.drafter import PAUSE_STEPS, NgramDrafter

    drafter = NgramDrafter(SpeculativeConfig("ngram", 4, 2, 1))
    seq = SimpleNamespace(sampling_params=SamplingParams(max_tokens=None), token_ids=[1, 2] * 5,
                          num_output_tokens=0, draft_state=None)  # fmt: skip
    assert drafter.propose(seq, 8)
    drafter.observe(seq, 4, 0)
    assert seq.draft_state.pause == 0  # one miss is no pattern yet
    drafter.observe(seq, 4, 0)
    assert seq.draft_state.pause == PAUSE_STEPS
    assert [drafter.propose(seq, 8) for _ in range(PAUSE_STEPS)] == [[]] * PAUSE_STEPS
    assert drafter.propose(seq, 8)  # tried again after the pause ...
    drafter.observe(seq, 4, 0)
    assert seq.draft_state.pause == 2 * PAUSE_STEPS  # ... and paused twice as long
    drafter.observe(seq, 4, 4)  # (an accepted draft resets the pause's length)
    assert seq.draft_state.next_pause == PAUSE_STEPS


def test_multi_step_scheduling_turns_speculation_off(engines):
    plain, _ = engines("tiny-qwen3-moe")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with LLM("tiny-qwen3-moe", dtype="float32", block_size=4, num_scheduler_steps=4,
             speculative_config=NGRAM) as multi:  # fmt: skip
        assert not any(s.drafter for s in multi.engine.schedulers)
        assert_same_outputs(generate(plain, [REPEATING], params)[0],
                            generate(multi, [REPEATING], params)[0])  # fmt: skip
        assert spec_counts(multi) == {}


def test_structured_outputs_are_not_drafted(engines):
    from afd.sampling.params import StructuredOutputsParams

    plain, spec = engines("tiny-qwen3-moe")
    params = SamplingParams(temperature=0, max_tokens=12,
                            structured_outputs=StructuredOutputsParams(regex="(ab)+"))  # fmt: skip
    before = spec_counts(spec).get("spec_decode_num_drafts_total", 0)
    assert_same_outputs(generate(plain, [REPEATING], params)[0],
                        generate(spec, [REPEATING], params)[0])  # fmt: skip
    assert spec_counts(spec).get("spec_decode_num_drafts_total", 0) == before


def test_preemption_with_drafts_recomputes_the_same_tokens(engines):
    """30 blocks of 4 tokens cannot hold 8 sequences of up to 40 tokens: preemption happens
    while drafts hold KV slots."""
    plain, _ = engines("tiny-qwen3-moe")
    prompts = [REPEATING, NOT_REPEATING] * 4
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with LLM("tiny-qwen3-moe", dtype="float32", block_size=4, num_kv_blocks=30,
             speculative_config=NGRAM) as small:  # fmt: skip
        got = generate(small, prompts, params)
        assert small.engine.stats()["num_preemptions_total"] > 0
        assert spec_counts(small)["spec_decode_num_accepted_tokens_total"] > 0
        assert_kv_free(small)
    for a, b in zip(generate(plain, prompts, params), got, strict=True):
        assert_same_outputs(a, b)


def test_spec_decode_counters_on_metrics():
    from afd.entrypoints.metrics import ServerMetrics, parse_prometheus_text
    from afd.spec.drafter import SpecCounts

    counts = SpecCounts()
    counts.add(4, 2), counts.add(3, 0)
    engine = SimpleNamespace(stats=counts.stats, failure_stats=dict)
    metrics = ServerMetrics("m")
    metrics.refresh(engine)
    samples = parse_prometheus_text(metrics.render().decode())
    label = (("model_name", "m"),)
    assert samples[("afd:spec_decode_num_drafts_total", label)] == 2
    assert samples[("afd:spec_decode_num_draft_tokens_total", label)] == 7
    assert samples[("afd:spec_decode_num_accepted_tokens_total", label)] == 2
    per_pos = "afd:spec_decode_num_accepted_tokens_per_pos_total"
    got = {dict(k[1])["position"]: v for k, v in samples.items() if k[0] == per_pos}
    assert got == {"0": 1, "1": 1, "2": 0, "3": 0}


# ---- every topology ----------------------------------------------------------------------------

# (prefill workers, attention workers, expert workers, micro-batches)
TOPOLOGIES = [(0, 1, 1, 1), (0, 2, 1, 2), (0, 2, 2, 3), (1, 1, 1, 1), (1, 2, 1, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("p,a,f,m", TOPOLOGIES)
def test_drafts_verified_across_processes_keep_the_tokens(engines, p, a, f, m):
    """Attention workers verify the drafts against their paged KV (expert workers see the extra
    rows), with and without a prefill pool: greedy tokens are transformers', seeded ones those
    of the single process without speculation."""
    model = "tiny-qwen3-moe"
    plain, _ = engines(model)
    prompts = [LOOPING[model], NOT_REPEATING, LOOPING[model][2:], [7, 8, 9, 7, 8, 9, 7]]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(temperature=0.5, seed=11, max_tokens=12, ignore_eos=True)
    with LLM(model, dtype="float32", block_size=4, num_prefill_workers=p,
             num_attention_workers=a, num_expert_workers=f,
             speculative_config=NGRAM) as llm:  # fmt: skip
        llm.engine.executor.num_micro_batches = m
        outs = generate(llm, prompts, greedy)
        assert_transformers_greedy(model, prompts, [o.outputs[0].token_ids for o in outs])
        for x, y in zip(generate(plain, prompts, seeded), generate(llm, prompts, seeded),
                        strict=True):  # fmt: skip
            assert y.outputs[0].token_ids == x.outputs[0].token_ids
        assert spec_counts(llm)["spec_decode_num_accepted_tokens_total"] > 0
        assert_kv_free(llm)


@pytest.mark.slow
def test_bench_serve_reports_acceptance_from_a_speculating_server(tmp_path, capsys):
    import argparse

    from conftest import launched

    from afd.benchmarks import serve

    with launched("tiny-qwen3-moe", "--speculative-config", json.dumps(NGRAM)) as (url, _):
        parser = argparse.ArgumentParser()
        serve.add_arguments(parser)
        args = parser.parse_args(["--base-url", url, "--num-prompts", "4",
                                  "--random-input-len", "8", "--random-output-len", "32",
                                  "--result-file", str(tmp_path / "serve.json")])  # fmt: skip
        assert serve.run(args) == 0
    m = json.loads((tmp_path / "serve.json").read_text())["spec_decode"]
    assert m["num_drafts"] > 0 and 0 <= m["acceptance_rate"] <= 1
    assert m["mean_acceptance_length"] == pytest.approx(
        1 + m["num_accepted_tokens"] / m["num_drafts"]
    )
    out = capsys.readouterr().out
    assert "Speculative Decoding" in out and "Acceptance rate (%)" in out

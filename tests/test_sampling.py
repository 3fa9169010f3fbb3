"""Sampler and SamplingParams: vLLM's request fields at their edges, the logits processors'
arithmetic, structured-output masks, and sampler state that follows the plan's positions."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from afd.builtin import resolve_model
from afd.sampling.params import SamplingParams, StructuredOutputsParams
from afd.sampling.sampler import Sampler, SequenceState, sequence_state
from afd.tokenizer import IncrementalDetokenizer, Tokenizer

VOCAB = 512
EOS = [0, 2]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("tiny-qwen3-moe")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def sampler(model_dir):
    return Sampler(EOS, model_dir)


# -- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"frequency_penalty": True}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -5}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"repetition_penalty": 1e400}, "repetition_penalty"),
        ({"min_tokens": -3}, "min_tokens"),
        ({"min_tokens": 2.0}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # more than max_tokens (16)
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"1e3": 1}}, "logit_bias"),
        ({"logit_bias": {str(2**64): 1}}, "logit_bias"),
        ({"logit_bias": {"\ud800": 1}}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"structured_outputs": {}}, "exactly one"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "choice"),
        ({"structured_outputs": {"choice": ["a"] * 1025}}, "choice"),
        ({"structured_outputs": {"regex": ""}}, "regex"),
        ({"structured_outputs": {"regex": "a" * 100_001}}, "characters"),
        ({"structured_outputs": {"regex": "\ud800"}}, "UTF-8"),
        ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
        ({"structured_outputs": {"json": "[1]"}}, "schema object"),
        ({"structured_outputs": {"json_object": False}}, "exactly one"),
        ({"structured_outputs": {"json_object": True}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_new_fields_are_checked_at_their_edges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_fields_travel_as_plan_params_and_back():
    p = SamplingParams(
        temperature=0.5,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.3,
        logit_bias={"7": 2.5, 3: -100},
        min_tokens=4,
        stop_token_ids=[9],
        prompt_logprobs=3,
        structured_outputs=StructuredOutputsParams(choice=['a"b', "ü"]),
    )
    assert p.logit_bias == {7: 2.5, 3: -100.0}
    q = SamplingParams.from_wire(json.loads(json.dumps(p.wire)))
    names = ["presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
             "min_tokens", "stop_token_ids", "prompt_logprobs", "structured_outputs"]  # fmt: skip
    for name in names:
        assert getattr(q, name) == getattr(p, name), name
    # plans for ordinary requests carry none of the newer fields
    assert set(SamplingParams().wire) == {"temperature", "top_p", "top_k", "min_p", "seed",
                                          "logprobs"}  # fmt: skip
    assert not SamplingParams().processes_logits and p.processes_logits and p.needs_history


# -- logits processors -------------------------------------------------------------------------


def _logits(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0))


def test_plain_rows_are_untouched_and_bias_moves_greedy(sampler):
    logits = _logits()
    plain = SamplingParams(temperature=0)
    biased = SamplingParams(temperature=0, logit_bias={77: 100, 5: -100})
    out = sampler(logits, [plain, biased, plain], [None] * 3, [None] * 3, [0] * 3)
    ref = logits.argmax(-1).tolist()
    assert out.token_ids[0] == ref[0] and out.token_ids[2] == ref[2]
    assert out.token_ids[1] == 77
    # bias towards the current favourite's rival, not enough to win: greedy keeps its pick
    small = SamplingParams(temperature=0, logit_bias={int(logits[1].argmin()): 1.0})
    assert sampler(logits[1:2], [small], [None], [None], [0]).token_ids == [ref[1]]


def test_min_tokens_suppresses_eos_and_stop_tokens_then_lets_them_through(sampler):
    logits = _logits(1)
    logits[0, 2] = 50.0  # EOS is the favourite
    logits[0, 9] = 40.0  # then a stop token
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[9])
    pick = lambda n_out: sampler(logits, [p], [None], [None], [n_out]).token_ids[0]  # noqa: E731
    assert pick(0) not in (0, 2, 9) and pick(2) not in (0, 2, 9)
    assert pick(3) == 2
    keep_eos = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, [keep_eos], [None], [None], [0]).token_ids == [2]


def test_penalties_follow_vllms_formulas(sampler):
    logits = _logits(1)
    prompt, output = [10, 11], [11, 12, 12]
    state = SequenceState(len(prompt), prompt + output)
    p = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)  # fmt: skip
    processed = logits.clone()
    sampler._process(processed, [logits[0]], [p], [state], [len(output)])
    want = logits.clone()[0]
    for t in (10, 11, 12):  # in prompt or output: repetition penalty
        want[t] = want[t] / 2 if want[t] > 0 else want[t] * 2
    counts = {11: 1, 12: 2}
    for t, c in counts.items():  # output only: frequency per occurrence, presence once
        want[t] -= 0.5 * c + 0.25
    assert torch.allclose(processed[0], want)
    untouched = [t for t in range(VOCAB) if t not in (10, 11, 12)]
    assert torch.equal(processed[0, untouched], logits[0, untouched])


def test_a_row_with_nothing_allowed_falls_back_to_its_grammar(sampler, tokenizer):
    # min_tokens forbids EOS while a finished grammar allows only EOS: the grammar wins
    p = SamplingParams(temperature=0, min_tokens=5, max_tokens=20,
                       structured_outputs=StructuredOutputsParams(choice=["ab"]))  # fmt: skip
    ids = tokenizer.encode("ab")
    state = SequenceState(1, [3, *ids])
    out = sampler(_logits(1), [p], [None], [state], [len(ids)])
    assert out.token_ids[0] in EOS


# -- structured outputs ------------------------------------------------------------------------

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
    },
    {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 1,
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                               "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                "required": ["x", "y"],
            },
            "tag": {"type": "string", "pattern": "^[a-z]{2,4}$"},
        },
        "required": ["point", "tag"],
    },
]  # fmt: skip


def _run_grammar(sampler, tokenizer, so, temperature=1.0, seed=0, steps=80, boost=None):
    """Sample under the mask from random logits (+ boost [V]) until EOS; the output's text."""
    p = SamplingParams(temperature=temperature, max_tokens=steps, structured_outputs=so)
    g = torch.Generator().manual_seed(seed)
    state = SequenceState(1, [3])
    for _ in range(steps):
        logits = torch.randn(1, VOCAB, generator=g) * 3
        if boost is not None:
            logits += boost
        tok = sampler(logits, [p], [g], [state], [len(state.output_ids)]).token_ids[0]
        if tok in EOS:
            return tokenizer.decode(state.output_ids)
        state.write(len(state.token_ids), [tok])
    raise AssertionError(f"no end within {steps} tokens: {tokenizer.decode(state.output_ids)!r}")


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_always_validates(sampler, tokenizer, schema, seed):
    text = _run_grammar(sampler, tokenizer, StructuredOutputsParams(json=schema), seed=seed)
    jsonschema.validate(json.loads(text), schema)


def test_grammars_never_spell_invalid_utf8_or_raw_control_characters(sampler, tokenizer):
    """Byte tokens favoured: xgrammar alone would let strings hold UTF-16 surrogates (ED A0..)
    and raw control characters, which are not valid JSON text once decoded."""
    backend = sampler.grammar_backend(VOCAB)
    high = torch.tensor([4.0 if t and (t[0] >= 0x80 or t[0] < 0x20) else 0.0
                         for t in backend.decoded])  # fmt: skip
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}},
              "required": ["s"]}  # fmt: skip
    for seed in range(12):
        so = StructuredOutputsParams(json=schema)
        text = _run_grammar(sampler, tokenizer, so, seed=seed, steps=120, boost=high)
        assert "\ufffd" not in text
        jsonschema.validate(json.loads(text), schema)
        text = _run_grammar(sampler, tokenizer, StructuredOutputsParams(regex=".{1,3}"),
                            seed=seed, boost=high)  # fmt: skip
        assert "\ufffd" not in text and 1 <= len(text) <= 3
    # after a lone 0xED lead byte only 80..9F may follow (A0..BF would be a surrogate)
    ed = backend.decoded.index(b"\xed")
    p = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex=".+"))
    mask = sampler._grammar_mask(VOCAB, [0], [p], [SequenceState(1, [3, ed])])
    allowed = [t for t in range(VOCAB) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
    assert allowed and all(0x80 <= backend.decoded[t][0] <= 0x9F for t in allowed)


def test_regex_choice_and_grammar_outputs_match(sampler, tokenizer):
    for seed in range(3):
        so = StructuredOutputsParams(regex=r"[a-z]{3}-\d{2,3}")
        assert re.fullmatch(r"[a-z]{3}-\d{2,3}", _run_grammar(sampler, tokenizer, so, seed=seed))
        choices = ["yes", "no", "ça va", 'a "quoted" one']
        so = StructuredOutputsParams(choice=choices)
        assert _run_grammar(sampler, tokenizer, so, seed=seed) in choices
        so = StructuredOutputsParams(grammar='root ::= "(" [0-9] ("+" [0-9])? ")"')
        assert re.fullmatch(r"\(\d(\+\d)?\)", _run_grammar(sampler, tokenizer, so, seed=seed))


def test_special_tokens_are_never_text_inside_a_grammar(sampler, tokenizer):
    # <|im_start|> is a special token: a free-text regex must not let it in as "text"
    im_start = tokenizer.token_to_id("<|im_start|>")
    logits = torch.zeros(1, VOCAB)
    logits[0, im_start] = 100.0
    p = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex=".{1,5}"))
    out = sampler(logits, [p], [None], [SequenceState(1, [3])], [0])
    assert out.token_ids[0] != im_start


def test_invalid_specs_are_value_errors(sampler):
    backend = sampler.grammar_backend(VOCAB)
    for kind, spec in [("regex", "(a"), ("json", '{"type": "nope"}'), ("grammar", "root ::= x")]:
        with pytest.raises(ValueError, match=f"invalid structured output {kind}"):
            backend.compile(kind, spec)
    # compiled once per process
    assert backend.compile("regex", "[ab]+") is backend.compile("regex", "[ab]+")


def test_grammar_state_follows_the_plan_not_the_number_of_calls(sampler, tokenizer):
    """A replayed step or a recomputed sequence must not advance the matcher twice; a sequence
    new to a worker is rebuilt from the history its plan entry carries."""
    p = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex="a[bc]d"))
    [a], [b], [c], [d] = (tokenizer.encode(x) for x in "abcd")
    states: dict = {}

    def allowed(start, tokens, history=None, store=states):
        state = sequence_state(store, 7, p, 1, start, tokens, history)
        mask = sampler._grammar_mask(VOCAB, [0], [p], [state])
        return {t for t in range(VOCAB) if (int(mask[0, t // 32]) >> (t % 32)) & 1}

    first = allowed(0, [3])  # prompt [3], nothing out yet
    assert a in first and b not in first and d not in first
    after_a = allowed(1, [a])
    assert {b, c} <= after_a and a not in after_a
    assert allowed(1, [a]) == after_a  # the same step replayed
    assert states[7].grammar.accepted == [a]
    assert allowed(2, [b]) == {d}
    assert allowed(2, [c]) == {d}  # replayed with another token: rolled back, not stacked
    assert states[7].grammar.accepted == [a, c]
    assert allowed(3, [d]) == set(EOS)  # the grammar ended: only the end may follow
    assert allowed(2, [b]) == {d}  # a replay from before the end rolls the end back too
    assert states[7].grammar.accepted == [a, b]
    # a worker that never saw the sequence needs its history, then masks the same
    fresh: dict = {}
    with pytest.raises(ValueError, match="no history"):
        sequence_state(fresh, 7, p, 1, 2, [b])
    assert allowed(2, [b], [3, a], store=fresh) == {d}
    assert fresh[7].token_ids == states[7].token_ids


# -- detokenizer -------------------------------------------------------------------------------


def test_include_stop_str_skip_special_tokens_and_min_tokens(tokenizer):
    ids = tokenizer.encode("Hello, my name is Ada")
    stop = SamplingParams(stop=["name"], include_stop_str_in_output=True)
    d = IncrementalDetokenizer(tokenizer, [], stop)
    assert d.add_tokens(ids) and d.text == "Hello, my name"
    d = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["name"]))
    assert d.add_tokens(ids) and d.text == "Hello, my "
    # stop strings count only once min_tokens tokens are out
    late = SamplingParams(stop=["Hello", "Ada"], min_tokens=3)
    d = IncrementalDetokenizer(tokenizer, [], late)
    assert d.add_tokens(ids) and d.text.startswith("Hello, my name") and d.stop_reason == "Ada"
    special = [tokenizer.token_to_id("<|im_start|>"), *tokenizer.encode("hi")]
    for skip, want in ((True, "hi"), (False, "<|im_start|>hi")):
        d = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
        d.add_tokens(special, final=True)
        assert d.text == want

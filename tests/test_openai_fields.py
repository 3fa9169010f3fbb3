"""The request fields vLLM users send, through the official openai client against a real
1 prefill + 1 attention + 1 expert cluster (`afd launch`), checked against the single-process
engine; structured outputs validated with jsonschema; the fields across other topologies; the
fields vLLM adds to responses (stop_reason, system_fingerprint), echo with max_tokens 0 and
/tokenizer_info (--enable-tokenizer-info-endpoint) as clients meet them."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from conftest import launched
from test_sampling import SCHEMAS

from afd import LLM, SamplingParams
from afd.sampling.params import StructuredOutputsParams

pytestmark = pytest.mark.slow

MODEL = "tiny-qwen3-moe"
KEY = "sk-fields"


@pytest.fixture(scope="module")
def server():
    args = ["--dtype", "float32", "--num-micro-batches", "2", "--max-model-len", "512",
            "--api-key", KEY, "--enable-tokenizer-info-endpoint"]  # fmt: skip
    with launched(*args) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline():
    with LLM(MODEL, dtype="float32") as llm:
        yield llm


def _complete(client, **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k not in ("prompt", "max_tokens", "temperature",
             "logit_bias", "presence_penalty", "frequency_penalty", "stop", "logprobs", "n",
             "echo", "stream", "seed")}  # fmt: skip
    return client.completions.create(model=MODEL, extra_body=extra or None, **kw)


def _offline(offline, prompt, **kw):
    params = SamplingParams(**kw)
    return offline.generate(prompt, params, use_tqdm=False)[0]


def test_sampling_fields_match_the_offline_engine(client, offline):
    tok = offline.get_tokenizer()
    eos, im_start = tok.eos_token_id, tok.token_to_id("<|im_start|>")
    cases = [
        {"logit_bias": {"77": 100}},
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 1.5},
        {"presence_penalty": -1.5},
        {"logit_bias": {str(eos): 100}, "min_tokens": 5, "ignore_eos": False},
        {"logit_bias": {str(im_start): 100}, "skip_special_tokens": False},
    ]
    base = _complete(client, prompt="Hello", max_tokens=10, temperature=0, ignore_eos=True)
    for case in cases:
        kw = {"ignore_eos": True, **case}
        got = _complete(client, prompt="Hello", max_tokens=10, temperature=0, **kw)
        bias = {int(t): b for t, b in kw.pop("logit_bias", {}).items()} or None
        want = _offline(offline, "Hello", temperature=0, max_tokens=10, logit_bias=bias, **kw)
        assert got.choices[0].text == want.outputs[0].text, case
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids), case
        assert got.choices[0].text != base.choices[0].text, case
    # what each is specified to do
    r = _complete(client, prompt="Hello", max_tokens=6, temperature=0, logit_bias={"77": 100})
    assert r.choices[0].text == tok.decode([77]) * 6
    r = _complete(client, prompt="Hello", max_tokens=20, temperature=0,
                  logit_bias={str(eos): 100}, min_tokens=5)  # fmt: skip
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "stop"
    r = _complete(client, prompt="Hello", max_tokens=20, temperature=0, logit_bias={str(eos): 100})
    assert r.usage.completion_tokens == 1 and r.choices[0].text == ""
    stop = base.choices[0].text[3:6]
    r = _complete(client, prompt="Hello", max_tokens=10, temperature=0, stop=[stop],
                  include_stop_str_in_output=True)  # fmt: skip
    assert r.choices[0].text.endswith(stop) and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base.choices[0].text[: base.choices[0].text.find(stop) + 3]
    # the same fields on chat
    msgs = [{"role": "user", "content": "Hi!"}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0,
                                       logit_bias={"77": 100})  # fmt: skip
    assert c.choices[0].message.content == tok.decode([77]) * 5


def test_structured_outputs_validate_streaming_and_not(client):
    aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=KEY, max_retries=0)

    async def one(schema, chat: bool, stream: bool, seed: int | None):
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}
        kw = dict(model=MODEL, max_tokens=120, stream=stream, seed=seed,
                  temperature=0 if seed is None else 1.0)  # fmt: skip
        if chat:
            msgs = [{"role": "user", "content": "Give me JSON"}]
            r = await aclient.chat.completions.create(messages=msgs, response_format=fmt, **kw)
        else:
            r = await aclient.completions.create(
                prompt="JSON:", extra_body={"response_format": fmt}, **kw
            )
        if not stream:
            c = r.choices[0]
            return schema, (c.message.content if chat else c.text), c.finish_reason
        text, finish = "", None
        async for chunk in r:
            for c in chunk.choices:
                text += (c.delta.content or "") if chat else c.text
                finish = c.finish_reason or finish
        return schema, text, finish

    async def main():
        jobs = [
            one(schema, chat, stream, seed)
            for schema in SCHEMAS
            for chat in (False, True)
            for stream in (False, True)
            for seed in (None, 11)
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert len(results) == 24
    for schema, text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    # the other constraint kinds, and vLLM's names for them
    cases = [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"guided_regex": r"\d{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_json": SCHEMAS[1]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS[1])
         is None),
        ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch(r"x\d\d?", t)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ]  # fmt: skip
    for extra, check in cases:
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0,
                                      extra_body=extra)  # fmt: skip
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text), (extra, r)


def test_batched_prompts_echo_and_prompt_logprobs(client, offline):
    prompts = ["Hello there", "The quick brown fox"]
    single = [
        _complete(client, prompt=p, max_tokens=6, temperature=0, ignore_eos=True).choices[0].text
        for p in prompts
    ]
    r = _complete(client, prompt=prompts, n=2, max_tokens=6, temperature=0, ignore_eos=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [single[0]] * 2 + [single[1]] * 2
    tok = offline.get_tokenizer()
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 24
    streamed: dict[int, str] = {}
    for chunk in _complete(client, prompt=prompts, max_tokens=6, temperature=0, ignore_eos=True,
                           stream=True):  # fmt: skip
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: single[0], 1: single[1]}
    # echo: the prompt leads the text; with logprobs, its tokens lead the logprobs (first: None)
    e = _complete(client, prompt=prompts[0], max_tokens=6, temperature=0, ignore_eos=True,
                  echo=True, logprobs=1)  # fmt: skip
    ids = tok.encode(prompts[0])
    assert e.choices[0].text == prompts[0] + single[0]
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == e.choices[0].text
    # prompt_logprobs (vLLM's field): from the prefill worker, equal to the offline engine's
    p = _complete(client, prompt=prompts[1], max_tokens=2, temperature=0, prompt_logprobs=2)
    got = p.choices[0].model_extra["prompt_logprobs"]
    want = _offline(offline, prompts[1], temperature=0, max_tokens=2, prompt_logprobs=2)
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for g, w in zip(got[1:], want.prompt_logprobs[1:], strict=True):
        assert {int(t) for t in g} == set(w)
        for t, v in w.items():
            assert abs(g[str(t)]["logprob"] - v.logprob) < 1e-3 and g[str(t)]["rank"] == v.rank
    echoed = _offline(offline, [ids], temperature=0, max_tokens=1, prompt_logprobs=1)
    for i, t in enumerate(ids[1:], start=1):
        assert abs(lp.token_logprobs[i] - echoed.prompt_logprobs[i][t].logprob) < 1e-3


def test_vllm_response_fields_and_prompt_scoring(server, client, offline):
    """stop_reason, system_fingerprint, echo with max_tokens 0 and /tokenizer_info through the
    openai client and httpx, against the cluster."""
    base = _complete(client, prompt="Hello", max_tokens=10, temperature=0, ignore_eos=True)
    stop = base.choices[0].text[3:6]
    r = _complete(client, prompt="Hello", max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    assert base.choices[0].model_extra["stop_reason"] is None  # length
    assert re.fullmatch(r"afd-[^-]+-p1-a1-f1-m2-[0-9a-f]{8}", r.system_fingerprint)
    msgs = [{"role": "user", "content": "Hi!"}]
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
    assert c.system_fingerprint == r.system_fingerprint
    # scoring a prompt (lm-eval's loglikelihood requests): its logprobs, no completion
    e = _complete(client, prompt="The quick brown fox", max_tokens=0, echo=True, logprobs=1)
    assert e.choices[0].text == "The quick brown fox" and e.usage.completion_tokens == 0
    ids = offline.get_tokenizer().encode("The quick brown fox")
    want = _offline(offline, [ids], temperature=0, max_tokens=1, prompt_logprobs=1)
    lp = e.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    for i, t in enumerate(ids[1:], start=1):
        assert abs(lp.token_logprobs[i] - want.prompt_logprobs[i][t].logprob) < 1e-3
    # what lm-eval's tokenizer_backend=remote asks for
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(f"{server}/tokenizer_info", headers=auth, timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and "chat_template" in info
    body = {"prompt": info["eos_token"], "add_special_tokens": False}
    tokens = httpx.post(f"{server}/tokenize", headers=auth, json=body, timeout=30)
    assert tokens.json()["tokens"] == [offline.get_tokenizer().eos_token_id]


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "not supported"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"foo": 1}, "foo", "Unrecognized request argument"),
        ({"repetition_penalty": -5}, "repetition_penalty", "> 0"),
        ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"min_tokens": -3}, "min_tokens", ">= 0"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"7": 500}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": {"99999": 1}}, None, "out of range"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
         None, "invalid structured output json"),
        ({"guided_regex": "("}, None, "invalid structured output regex"),
        ({"guided_regex": "\ud800"}, "guided_regex", "UTF-8"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        ({"guided_json": {"type": "string"}, "ignore_eos": True}, "guided_json", "ignore_eos"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
        ({"prompt_logprobs": 21}, "prompt_logprobs", "between 0 and 20"),
    ],
)  # fmt: skip
def test_bad_fields_are_openai_400s(server, body, param, words):
    r = httpx.post(
        f"{server}/v1/completions",
        # json.dumps escapes a lone surrogate as \ud800, which is valid JSON text
        content=json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **body}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert words in err["message"], err


def test_fields_across_topologies():
    """The same fields give the same tokens in the single-process engine and a 1A+1F cluster
    with two micro-batches and four decode steps per plan (workers feed tokens back)."""
    schema = SCHEMAS[0]
    requests = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5),
        SamplingParams(
            temperature=0,
            max_tokens=12,
            ignore_eos=True,
            frequency_penalty=1.0,
            presence_penalty=0.5,
            logit_bias={5: 3.0},
        ),  # fmt: skip
        SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logit_bias={0: 50, 2: 50}),
        SamplingParams(
            temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema)
        ),  # fmt: skip
        SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1),
    ]
    prompts = ["Hello", "Hello there my friend, " * 3]

    def run(**kw):
        with LLM(MODEL, dtype="float32", max_num_batched_tokens=16, **kw) as llm:
            outs = [llm.generate(prompts, p, use_tqdm=False) for p in requests]
        tokens = [[(o.outputs[0].token_ids, o.outputs[0].text) for o in out] for out in outs]
        prompt_lps = [
            {(i, t): v.logprob for i, e in enumerate(o.prompt_logprobs[1:]) for t, v in e.items()}
            for o in outs[-1]
        ]
        return tokens, prompt_lps

    single, single_lps = run()
    cluster, cluster_lps = run(num_attention_workers=1, num_expert_workers=1,
                               num_micro_batches=2, num_scheduler_steps=4)  # fmt: skip
    assert cluster == single
    for a, b in zip(single_lps, cluster_lps, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    jsonschema.validate(json.loads(single[3][0][1]), schema)

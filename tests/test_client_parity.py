"""What real clients of vLLM's server rely on, over HTTP (an in-process engine behind the app):
a structured output that reaches a grammar dead end fails with an error instead of stopping with
text that breaks its constraint (on a vocabulary built to have the trap); max_tokens 0 with echo
scores the prompt only; GET /tokenizer_info behind --enable-tokenizer-info-endpoint; stop_reason
and system_fingerprint where vLLM puts them."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
import torch
from conftest import hf_rows
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

import afd
from afd import LLM, SamplingParams
from afd.config import EngineConfig
from afd.engine.async_engine import AsyncEngine
from afd.entrypoints.server import build_app
from afd.entrypoints.serving_base import system_fingerprint
from afd.models.tiny import build_tiny_checkpoint
from afd.sampling.params import StructuredOutputsParams
from afd.sampling.sampler import Sampler, SequenceState
from afd.sampling.structured import GRAMMAR_DEAD_END

# "w2" is a token and a prefix of "w27" and of "w20", but neither "7" nor "0" is a token: once
# "w2" is out, choice ["w5", "w27"] and regex "w[2-4]0" cannot be completed.
TRAP_WORDS = ["<unk>", "</s>", "w", "w2", "w3", "w5", "2", "3", "5", "x", "y", "z"]
TRAP = {w: i for i, w in enumerate(TRAP_WORDS)}
EOS = TRAP["</s>"]
CHOICE = {"choice": ["w5", "w27"]}
REGEX = {"regex": "w[2-4]0"}
TO_W2 = {str(TRAP["w2"]): 100}  # the trap's first step, whatever the random weights prefer


@pytest.fixture(scope="module")
def trap_model(tmp_path_factory):
    """A tiny Qwen3-MoE (transformers' classes) with a WordLevel vocabulary that has the trap."""
    out = tmp_path_factory.mktemp("trap")
    build_tiny_checkpoint("qwen3-moe", out, seed=3, vocab_size=len(TRAP_WORDS),
                          eos_token_id=EOS, pad_token_id=EOS, bos_token_id=None)  # fmt: skip
    tok = HFTokenizer(models.WordLevel(TRAP, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.Fuse()  # "w" "2" reads "w2"
    tok.add_special_tokens(["</s>"])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _client(model, **settings):
    engine = AsyncEngine(
        EngineConfig.from_flat(model=str(model), dtype="float32", max_model_len=64)
    )
    return engine, TestClient(build_app(engine, **settings))


@pytest.fixture(scope="module")
def trap_client(trap_model):
    engine, client = _client(trap_model, enable_tokenizer_info_endpoint=True)
    with client:
        yield client
    engine.shutdown()


@pytest.fixture(scope="module")
def tiny_client(builtin_path):
    engine, client = _client(builtin_path("tiny-qwen3-moe"), api_key="sk-parity")
    client.headers["Authorization"] = "Bearer sk-parity"
    with client:
        yield client
    engine.shutdown()


def sse(text: str) -> list:
    events = [b[len("data: ") :] for b in text.split("\n\n") if b.strip()]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def _stream(client, path, body) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        return sse(r.read().decode())


# -- a grammar dead end fails the request -------------------------------------------------------


def test_dead_end_is_detected_where_the_mask_is_built(trap_model):
    """The sampler fails only the trapped row (token -1, the reason), the other row samples."""
    sampler = Sampler([EOS], trap_model)
    params = [
        SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(**spec))
        for spec in (CHOICE, REGEX, CHOICE)
    ]
    states = [SequenceState(2, [9, 10, TRAP["w2"]]), SequenceState(2, [9, 10, TRAP["w2"]]),
              SequenceState(2, [9, 10, TRAP["w5"]])]  # fmt: skip
    out = sampler.sample_isolated(torch.zeros(3, len(TRAP_WORDS)), params, [None] * 3, states)
    assert out.token_ids[:2] == [-1, -1] and out.token_ids[2] == EOS  # "w5" is complete
    assert set(out.errors) == {0, 1}
    for row, kind in ((0, "choice"), (1, "regex")):
        assert out.errors[row].startswith(GRAMMAR_DEAD_END), out.errors[row]
        assert "'w2'" in out.errors[row] and kind in out.errors[row]


@pytest.mark.parametrize("spec", [CHOICE, REGEX], ids=["choice", "regex"])
def test_dead_end_offline_fails_only_that_request(trap_model, spec):
    trapped = SamplingParams(temperature=0, max_tokens=5, logit_bias={TRAP["w2"]: 100},
                             structured_outputs=StructuredOutputsParams(**spec))  # fmt: skip
    fine = SamplingParams(temperature=0, max_tokens=5, logit_bias={TRAP["w5"]: 100},
                          structured_outputs=StructuredOutputsParams(**CHOICE))  # fmt: skip
    with LLM(str(trap_model), dtype="float32") as llm:
        bad, good = llm.generate([[9, 10], [9, 11]], [trapped, fine], use_tqdm=False)
    assert bad.error is not None and bad.error.startswith(GRAMMAR_DEAD_END), bad.error
    assert bad.outputs[0].finish_reason == "abort"  # never "stop" with the text "w2"
    assert good.error is None and good.outputs[0].finish_reason == "stop"
    assert good.outputs[0].text == "w5"


@pytest.mark.parametrize(
    "path,field,spec",
    [
        ("/v1/completions", "structured_outputs", CHOICE),
        ("/v1/completions", "guided_regex", REGEX["regex"]),
        ("/v1/chat/completions", "guided_choice", CHOICE["choice"]),
        ("/v1/chat/completions", "structured_outputs", REGEX),
    ],
)
def test_dead_end_over_http_is_an_error(trap_client, path, field, spec):
    """Non-streaming: an OpenAI-shaped 400 that names the dead end; streaming: the text so far,
    then an error event (never a finish_reason)."""
    prompt = {"prompt": "x y"} if "chat" not in path else {"messages": [
        {"role": "user", "content": "x y"}]}  # fmt: skip
    body = {**prompt, "max_tokens": 5, "temperature": 0, "logit_bias": TO_W2, field: spec}
    r = trap_client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "structured_output_dead_end"
    assert err["message"].startswith(GRAMMAR_DEAD_END) and "'w2'" in err["message"]
    events = _stream(trap_client, path, body)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "structured_output_dead_end"
    assert all(c["finish_reason"] is None for e in events[:-2] for c in e["choices"])
    if spec not in (CHOICE, CHOICE["choice"]):
        return  # no output of this vocabulary fits "w[2-4]0"
    # the same choice where the model takes the other word ends as it should
    ok = trap_client.post(path, json={**body, "logit_bias": {str(TRAP["w5"]): 100}}).json()
    choice = ok["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice.get("text", (choice.get("message") or {}).get("content")) == "w5"


def test_dead_end_two_tokens_in(trap_client):
    """'w' then '2' leaves the same dead end one token later, after text was streamed."""
    body = {"prompt": "x y", "max_tokens": 5, "temperature": 0, "structured_outputs": CHOICE,
            "logit_bias": {str(TRAP["w"]): 100, str(TRAP["2"]): 100}}  # fmt: skip
    r = trap_client.post("/v1/completions", json=body)
    assert r.status_code == 400 and "after 2 output token(s) ('w2')" in r.json()["error"]["message"]
    events = _stream(trap_client, "/v1/completions", body)
    assert "".join(c["text"] for e in events[:-2] for c in e["choices"]) == "w2"
    assert events[-2]["error"]["code"] == "structured_output_dead_end"


@pytest.mark.slow
def test_dead_end_in_a_cluster(trap_model):
    """Sampling on an attention worker (1A1F): the same error reaches the request."""
    trapped = SamplingParams(temperature=0, max_tokens=5, logit_bias={TRAP["w2"]: 100},
                             structured_outputs=StructuredOutputsParams(**REGEX))  # fmt: skip
    with LLM(str(trap_model), dtype="float32", num_attention_workers=1,
             num_expert_workers=1) as llm:  # fmt: skip
        bad, good = llm.generate([[9, 10], [9, 11]], [trapped, SamplingParams(max_tokens=3)],
                                 use_tqdm=False)  # fmt: skip
    assert bad.error is not None and bad.error.startswith(GRAMMAR_DEAD_END)
    assert bad.outputs[0].finish_reason == "abort"
    assert good.error is None and len(good.outputs[0].token_ids) >= 1


# -- max_tokens 0 with echo: the prompt's logprobs, no completion ----------------------------------


def test_echo_with_max_tokens_zero_scores_the_prompt(tiny_client, builtin_path):
    prompt = "The quick brown fox jumps"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    r = tiny_client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    ids = tiny_client.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                            "total_tokens": len(ids)}  # fmt: skip
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == prompt and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0
    rows = hf_rows(builtin_path("tiny-qwen3-moe"), [ids])[0]  # transformers, teacher forcing
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - float(rows[i - 1, ids[i]])) < 1e-4
        assert lp["top_logprobs"][i]  # (alternatives that decode alike share a key)
    # streaming: the same text and logprobs in the chunks, the last one finishing
    events = _stream(tiny_client, "/v1/completions", body)
    chunks = [c for e in events[:-1] for c in e["choices"]]
    assert "".join(c["text"] for c in chunks) == prompt
    streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    assert chunks[-1]["finish_reason"] == "length"
    # without logprobs: the prompt's text alone, also for n choices
    plain = tiny_client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0,
                                                      "echo": True, "n": 2}).json()  # fmt: skip
    assert [c["text"] for c in plain["choices"]] == [prompt, prompt]
    assert all(c["logprobs"] is None for c in plain["choices"])


@pytest.mark.parametrize(
    "path,body,param,words",
    [
        ("/v1/completions", {"max_tokens": 0}, "max_tokens", "at least 1"),
        ("/v1/completions", {"max_tokens": -1, "echo": True}, "max_tokens", "at least 0 with"),
        ("/v1/completions", {"max_tokens": 2**64, "echo": True}, "max_tokens", "less than"),
        ("/v1/completions", {"max_tokens": 0.5, "echo": True}, "max_tokens", "integer"),
        ("/v1/completions", {"max_tokens": "0", "echo": True}, "max_tokens", "integer"),
        ("/v1/completions", {"max_tokens": 0, "echo": "yes"}, "echo", "true or false"),
        ("/v1/completions", {"max_tokens": 0, "echo": True, "prompt": "x " * 5000}, "prompt",
         "maximum context length"),
        ("/v1/completions", {"max_tokens": 0, "echo": True, "prompt": "\ud800"}, "prompt",
         "lone surrogate"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", "at least 1"),
        ("/v1/chat/completions", {"max_tokens": 1, "echo": True}, "echo", "Unrecognized"),
        ("/v1/completions", {"stop_reason": "x"}, "stop_reason", "Unrecognized"),
        ("/v1/completions", {"system_fingerprint": "x"}, "system_fingerprint", "Unrecognized"),
    ],
)  # fmt: skip
def test_bad_new_fields_are_openai_400s(tiny_client, path, body, param, words):
    base = {"prompt": "Hello"} if "chat" not in path else {
        "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
    r = tiny_client.post(path, content=json.dumps({**base, **body}),
                         headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert words in err["message"], err


# -- GET /tokenizer_info ------------------------------------------------------------------------


def test_tokenizer_info_is_off_by_default(tiny_client):
    r = tiny_client.get("/tokenizer_info")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "not_found" and "--enable-tokenizer-info-endpoint" in err["message"]


def test_tokenizer_info_serves_what_lm_eval_reads(trap_client):
    """vLLM's answer (the tokenizer config without file paths, special tokens as text, the
    class and the chat template), and the calls lm-eval's remote tokenizer then makes."""
    info = trap_client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["unk_token"] == "<unk>"  # AddedToken -> text
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["chat_template"].startswith("{% for m in messages %}")
    body = {"prompt": info["eos_token"], "add_special_tokens": False}
    ids = trap_client.post("/tokenize", json=body).json()["tokens"]
    assert ids == [EOS]
    assert trap_client.post("/detokenize", json={"tokens": [9, 10]}).json()["prompt"] == "xy"
    r = trap_client.post("/tokenizer_info", json={})
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_tokenizer_info_of_a_bpe_tokenizer_needs_the_key(builtin_path):
    engine, client = _client(builtin_path("tiny-qwen3-moe"), api_key="sk-info",
                             enable_tokenizer_info_endpoint=True)  # fmt: skip
    try:
        with client:
            assert client.get("/tokenizer_info").status_code == 401
            r = client.get("/tokenizer_info", headers={"Authorization": "Bearer sk-info"})
            info = r.json()
    finally:
        engine.shutdown()
    tok = engine.tokenizer
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == tok.chat_template
    config = json.loads((builtin_path("tiny-qwen3-moe") / "tokenizer_config.json").read_text())
    assert info["model_max_length"] == config["model_max_length"]
    assert not {"vocab_file", "merges_file", "tokenizer_file"} & set(info)


def test_tokenizer_info_flag(tmp_path, capsys):
    from afd.entrypoints.cli import build_parser, main
    from afd.entrypoints.launch import server_config_from_args

    parser = build_parser()
    off = server_config_from_args(parser.parse_args(["serve"]))
    on = server_config_from_args(parser.parse_args(["serve", "--enable-tokenizer-info-endpoint"]))
    assert not off.enable_tokenizer_info_endpoint and on.enable_tokenizer_info_endpoint
    assert main(["serve", "--enable-tokenizer-info-endpoint=yes"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--enable-tokenizer-info-endpoint" in err
    config = tmp_path / "cluster.yaml"
    config.write_text("enable-tokenizer-info-endpoint: true\n")
    from afd.entrypoints.launch import apply_config_file

    serve = parser._subparsers._group_actions[0].choices["serve"]  # as main() does
    apply_config_file(serve, ["--config", str(config)])
    assert server_config_from_args(parser.parse_args(["serve"])).enable_tokenizer_info_endpoint


# -- stop_reason and system_fingerprint --------------------------------------------------------


def _prompt(path: str) -> dict:
    if "chat" in path:
        return {"messages": [{"role": "user", "content": "Hello there"}]}
    return {"prompt": "Hello there"}


def _greedy_ids(client, path: str, n: int) -> list[int]:
    """The greedy continuation's token ids, from the engine behind the app."""
    engine = client.app.state.afd.engine
    ids = client.post("/tokenize", json=_prompt(path)).json()["tokens"]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    async def run():
        return [o async for o in engine.generate(f"probe-{path}", ids, params)]

    return asyncio.run(run())[-1].outputs[0].token_ids


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_reason_as_vllm_fills_it(tiny_client, path):
    """The stop string or stop token id that ended a choice; null for EOS and length; the same
    in the finishing chunk of a stream (and null in the chunks before it)."""
    base = {**_prompt(path), "max_tokens": 8, "temperature": 0}
    first = tiny_client.post(path, json={**base, "ignore_eos": True}).json()["choices"][0]
    full = first.get("text", (first.get("message") or {}).get("content"))
    assert len(full) >= 6, full
    ids = _greedy_ids(tiny_client, path, 8)
    eos = tiny_client.app.state.afd.engine.tokenizer.eos_token_id
    cases = [
        ({"stop": ["never there", full[3:6]]}, "stop", full[3:6]),
        ({"stop_token_ids": [ids[2]], "ignore_eos": True}, "stop", ids[2]),
        ({"logit_bias": {str(eos): 100}}, "stop", None),  # EOS
        ({"ignore_eos": True}, "length", None),
    ]
    for extra, finish, reason in cases:
        body = {**base, **extra}
        got = tiny_client.post(path, json=body).json()["choices"][0]
        assert (got["finish_reason"], got["stop_reason"]) == (finish, reason), extra
        events = _stream(tiny_client, path, body)
        choices = [c for e in events[:-1] for c in e["choices"]]
        assert [(c["finish_reason"], c["stop_reason"]) for c in choices if c["finish_reason"]] \
            == [(finish, reason)]  # fmt: skip
        assert all(c["stop_reason"] is None for c in choices if not c["finish_reason"])


def test_system_fingerprint_as_vllm_fills_it(tiny_client):
    """Whole completions and chat responses carry it (the same for every request of this
    server); stream chunks do not (vLLM's chunk schemas have no such field)."""
    a = tiny_client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).json()
    b = tiny_client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()  # fmt: skip
    version = re.escape(afd.__version__)
    assert re.fullmatch(rf"afd-{version}-[0-9a-f]{{8}}", a["system_fingerprint"])
    assert b["system_fingerprint"] == a["system_fingerprint"]
    events = _stream(tiny_client, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert all("system_fingerprint" not in e for e in events[:-1])


def test_system_fingerprint_follows_the_settings():
    class Fake:
        def __init__(self, **kw):
            self.config = EngineConfig.from_flat(**kw)

    base = system_fingerprint(Fake(dtype="float32"))
    assert system_fingerprint(Fake(dtype="float32")) == base
    assert system_fingerprint(Fake(dtype="bfloat16")) != base
    split = system_fingerprint(Fake(dtype="float32", num_attention_workers=2,
                                    num_expert_workers=1, num_micro_batches=2))  # fmt: skip
    assert re.fullmatch(rf"afd-{re.escape(afd.__version__)}-p0-a2-f1-m2-[0-9a-f]{{8}}", split)

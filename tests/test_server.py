"""HTTP server against a deterministic fake engine: OpenAI shapes (TestClient and the official
openai client over real uvicorn), errors, disconnect -> abort, and /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from afd.builtin import train_bytelevel_bpe
from afd.entrypoints.metrics import parse_prometheus_text
from afd.entrypoints.protocol import EngineClient
from afd.entrypoints.server import build_app
from afd.outputs import CompletionOutput, Logprob, RequestOutput
from afd.sampling.params import SamplingParams
from afd.tokenizer import Tokenizer

MODEL = "fake-moe"
M = (("model_name", MODEL),)  # every metric's label
MAX_MODEL_LEN = 96


class FakeEngine:
    """Generates token `(seed_of(prompt) + 3 * step + 5 * index) % len(safe)` from ASCII-only
    tokens, so text grows monotonically; honours max_tokens, records aborts."""

    def __init__(self, tokenizer: Tokenizer, step_s: float = 0.0):
        self.model_name = self.model_root = MODEL
        self.max_model_len = MAX_MODEL_LEN
        self.tokenizer = tokenizer
        self.config = None  # no engine settings: the fingerprint hashes name and length
        self.sequence_capacity = None  # no admission limit
        self.step_s = step_s
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.params: list[SamplingParams] = []
        self.healthy = (True, "ok")
        self.fail_after: int | None = None  # raise RuntimeError after this many steps
        self.vocab = tokenizer.vocab_size
        self.safe = [
            i
            for i in range(self.vocab)
            if re.fullmatch(r"[a-z ]+", tokenizer.decode([i], skip_special_tokens=False) or "")
        ]

    def expected_ids(self, prompt_ids: list[int], n_tokens: int, index: int = 0) -> list[int]:
        seed = sum(prompt_ids)
        return [self.safe[(seed + 3 * s + 5 * index) % len(self.safe)] for s in range(n_tokens)]

    def expected_text(self, prompt_ids: list[int], n_tokens: int, index: int = 0) -> str:
        return self.tokenizer.decode(self.expected_ids(prompt_ids, n_tokens, index))

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.started.append(request_id)
        self.params.append(params)
        if any(t >= self.vocab for t in prompt_token_ids):
            raise ValueError(f"token id out of range for vocabulary size {self.vocab}")
        fail_after = self.fail_after
        for step in range(1, params.max_tokens + 1):
            await asyncio.sleep(self.step_s)
            if fail_after is not None and step > fail_after:
                raise RuntimeError("expert worker 1 died")
            outputs = []
            for index in range(params.n):
                ids = self.expected_ids(prompt_token_ids, step, index)
                logprobs = None
                if params.logprobs is not None:
                    # sampled token at -0.5; the top-k are the next ids, higher when k allows
                    logprobs = [
                        {
                            t: Logprob(-0.5),
                            **{
                                (t + j) % self.vocab: Logprob(-0.1 * j, j)
                                for j in range(1, params.logprobs + 1)
                            },
                        }
                        for t in ids
                    ]
                done = step == params.max_tokens
                outputs.append(
                    CompletionOutput(
                        index=index,
                        text=self.tokenizer.decode(ids),
                        token_ids=ids,
                        logprobs=logprobs,
                        finish_reason="length" if done else None,
                    )
                )
            if done:
                self.finished.append(request_id)
            yield RequestOutput(request_id, None, prompt_token_ids, outputs, finished=done)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def health(self) -> tuple[bool, str]:
        return self.healthy

    def failure_stats(self) -> dict:
        return {}

    def stats(self) -> dict[str, float]:
        return {
            "num_requests_running": 0.0,
            "num_requests_waiting": 0.0,
            "kv_cache_usage_perc": 0.25,
            "afd_stage_attention_seconds": 1.5,
            "afd_stage_expert_seconds": 2.5,
        }


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bytelevel_bpe(path, 512)
    return Tokenizer.from_pretrained(path)


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine):
    with TestClient(build_app(engine)) as c:
        yield c


def sse_events(text: str) -> list:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_fake_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, EngineClient)
    assert len(engine.safe) > 20


# -- completions and chat: shapes and content ------------------------------------------------


def test_completion_matches_engine_and_openai_shape(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer.encode("hello world")
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == engine.expected_text(ids, 16)  # OpenAI default max_tokens
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 16,
                             "total_tokens": len(ids) + 16}  # fmt: skip
    assert engine.finished == [body["id"]] and engine.aborted == []


def test_prompt_forms_are_equivalent(client, tokenizer):
    ids = tokenizer.encode("the quick fox")
    texts = set()
    for prompt in ("the quick fox", ["the quick fox"], ids, [ids]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1


def test_completion_stream_deltas_concatenate_to_the_full_text(client, engine, tokenizer):
    body = {"prompt": "streaming", "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    ids = tokenizer.encode("streaming")
    assert "".join(c["choices"][0]["text"] for c in chunks) == engine.expected_text(ids, 7)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)


def test_chat_completion_uses_template_and_remaining_context(client, engine, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    remaining = MAX_MODEL_LEN - len(ids)  # chat default: the rest of the context
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant",
                                 "content": engine.expected_text(ids, remaining)}  # fmt: skip
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == remaining
    # max_completion_tokens wins over max_tokens; content parts are joined
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}
    ]
    body = {"messages": parts, "max_tokens": 9, "max_completion_tokens": 3}
    r = client.post("/v1/chat/completions", json=body)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_chat_stream_role_first_then_content(client, engine, tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        add_special_tokens=False,
    )
    assert text == engine.expected_text(ids, 4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"prompt": "abc", "n": 2, "max_tokens": 3})
    choices = r.json()["choices"]
    ids = tokenizer.encode("abc")
    assert [c["index"] for c in choices] == [0, 1]
    assert [c["text"] for c in choices] == [engine.expected_text(ids, 3, i) for i in range(2)]
    assert r.json()["usage"]["completion_tokens"] == 6
    body = {"prompt": "abc", "n": 2, "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = sse_events(r.read().decode())[:-1]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == engine.expected_text(ids, 3, i)


def test_logprobs_formats(client, engine, tokenizer):
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "logprobs": 2})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    ids = engine.expected_ids(tokenizer.encode("abc"), 3)
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"] == [-0.5] * 3
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(-0.1) for top in lp["top_logprobs"]
    )
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"][1:] == [lp["text_offset"][i] + len(lp["tokens"][i]) for i in range(2)]
    assert "".join(lp["tokens"]) == choice["text"]

    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True,
            "top_logprobs": 3}  # fmt: skip
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"][
        "content"
    ]
    assert len(content) == 2
    for item in content:
        assert item["logprob"] == -0.5 and item["bytes"] == list(item["token"].encode())
        tops = [t["logprob"] for t in item["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
    # streamed chat logprobs arrive with their tokens
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks = sse_events(r.read().decode())[1:-1]
    streamed = [
        i
        for c in chunks
        if c["choices"][0]["logprobs"]
        for i in c["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content


# -- errors ------------------------------------------------------------------------------------

LONG = list(range(1, MAX_MODEL_LEN + 1))


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", "{not json", 400, None),
        ("/v1/completions", "[1, 2]", 400, None),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids"),
        ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
         "stream_options"),
        ("/v1/completions", {"prompt": "hi", "logprobs": "x"}, 400, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "echo": 1}, 400, "echo"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": []}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", 2]}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
        ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
        ("/v1/completions", {"prompt": LONG[:90], "max_tokens": 10}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [10**6]}, 400, None),  # the engine's ValueError
        ("/v1/completions", {"prompt": "hi", "model": "nope"}, 404, "model"),
        # integers beyond 64 bits and non-finite numbers never reach the engine
        ("/v1/completions", {"prompt": "hi", "top_k": 2**64}, 400, "top_k"),
        ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k"),
        ("/v1/completions", {"prompt": "hi", "seed": 2**63}, 400, "seed"),
        ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2**64}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 2**70}, 400, "n"),
        ("/v1/completions", {"prompt": [2**64]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [2**64]}, 400, "stop_token_ids"),
        ("/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
        ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
        ("/v1/completions", '{"prompt": "hi", "top_p": -Infinity}', 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "temperature": 10**400}, 400, "temperature"),
        # lone surrogates: valid JSON escapes, invalid Unicode
        ("/v1/completions", r'{"prompt": "a\ud800b"}', 400, "prompt"),
        ("/v1/completions", r'{"prompt": "hi", "stop": ["\udfff"]}', 400, "stop"),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}', 400,
         "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 400}]}, 400,
         "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "model": "gpt-4"}, 404, "model"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(client, engine, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post(path, headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"
    # a rejected request never leaves work in the engine
    assert len(engine.started) == len(engine.finished) + len(set(engine.aborted))


def test_request_fields_reach_sampling_params(client, engine):
    body = {
        "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "min_p": 0.1, "seed": 3, "stop": "x", "stop_token_ids": [9], "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.2, "logit_bias": {"5": 10},
        "min_tokens": 2, "ignore_eos": False, "skip_special_tokens": False,
        "include_stop_str_in_output": True, "prompt_logprobs": 1, "logprobs": 2,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "user": "someone", "metadata": {"k": "v"},
    }  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    p = engine.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 7, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.max_tokens, p.min_tokens) == (["x"], [9], 5, 2)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.logit_bias == {5: 10.0} and p.logprobs == 2 and p.prompt_logprobs == 1
    assert not p.skip_special_tokens and p.include_stop_str_in_output
    assert p.structured_outputs.spec == ("json", '{"type": "object"}')
    for extra, spec in [
        ({"response_format": {"type": "json_object"}}, ("json_object", "")),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_regex": "a+"}, ("regex", "a+")),
        ({"guided_choice": ["a", "b"]}, ("choice", '["a", "b"]')),
        ({"guided_grammar": 'root ::= "a"'}, ("grammar", 'root ::= "a"')),
        ({"guided_json": '{"type": "string"}'}, ("json", '{"type": "string"}')),
        ({"structured_outputs": {"regex": "b"}}, ("regex", "b")),
    ]:
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra})  # fmt: skip
        assert r.status_code == 200, (extra, r.text)
        so = engine.params[-1].structured_outputs
        assert (so.spec if so else None) == spec
    # echo with batched prompts: prompt-major choice order, each text led by its prompt
    r = client.post("/v1/completions", json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3,
                                             "echo": True})  # fmt: skip
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c, prompt, i in zip(choices, ["ab", "ab", "cd", "cd"], [0, 1, 0, 1], strict=True):
        assert c["text"] == prompt + engine.expected_text(tokenizer_ids(engine, prompt), 3, i)


def tokenizer_ids(engine, text):
    return engine.tokenizer.encode(text)


@pytest.mark.parametrize(
    "body,param,message",
    [
        ({"prompt": "hi", "foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
        ({"prompt": 5}, "prompt", "'prompt' must be a string, a list of strings"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "must be a number"),
        ({"prompt": "hi", "temperature": float("nan")}, "temperature", "finite"),
        ({"prompt": "hi", "stream_options": {"include_usage": 1}, "stream": True},
         "stream_options", "'stream_options.include_usage' must be true or false"),
        ({"prompt": "hi", "logit_bias": {"5": "x"}}, "logit_bias",
         "'logit_bias.5' must be a number"),
        ({"prompt": "hi", "response_format": {"type": "yaml"}}, "response_format",
         "'json_object'"),
        ({"prompt": "hi", "tools": [{"type": "function"}]}, "tools", "not supported"),
        ({"prompt": "hi", "n": 1.5}, "n", "must be an integer"),
    ],
)  # fmt: skip
def test_schema_errors_name_the_field(client, body, param, message):
    r = client.post("/v1/completions", content=json.dumps(body),
                    headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def test_no_422_and_unknown_routes_are_openai_shaped(client):
    for r in (client.get("/v1/completions"), client.post("/v1/nowhere", json={})):
        assert r.status_code in (404, 405)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_api_key(engine):
    with TestClient(build_app(engine, api_key="sk-secret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
            r = c.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.get("/v1/models", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer sk-secret"}
        assert c.post("/v1/completions", json={"prompt": "hi"}, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL
        assert c.get("/health").status_code == 200  # probes need no key
        assert c.get("/metrics").status_code == 200


def test_unhealthy_engine_gives_503(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    engine.healthy = (False, "expert worker 1 is dead")
    r = client.get("/health")
    assert r.status_code == 503 and "expert worker 1 is dead" in r.text
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and "expert worker 1 is dead" in r.json()["error"]["message"]
    assert engine.started == []


def test_engine_failure_is_500_with_body_and_stream_error_event(engine):
    engine.fail_after = 2
    with TestClient(build_app(engine), raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and "expert worker 1 died" in err["message"]
        assert "Traceback" not in r.text
        body = {"prompt": "hi", "max_tokens": 5, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.read().decode())
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"
        assert "".join(e["choices"][0]["text"] for e in events[:-2]) != ""


# -- real server: openai client, concurrency, disconnects ---------------------------------------


class ServerThread:
    """uvicorn on a free 127.0.0.1 port in a daemon thread; stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="error", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive()


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_openai_client_against_uvicorn(engine, tokenizer):
    import openai

    engine.step_s = 0.001
    with ServerThread(build_app(engine, api_key="sk-test")) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-test", max_retries=0)
        ids = tokenizer.encode("Hello there")
        r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6)
        assert r.choices[0].text == engine.expected_text(ids, 6)
        assert r.usage.completion_tokens == 6
        parts = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=6,
                                               stream=True))  # fmt: skip
        assert "".join(p.choices[0].text for p in parts) == r.choices[0].text

        messages = [{"role": "user", "content": "Hi"}]
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
        assert chat.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5,
                                                stream=True,
                                                stream_options={"include_usage": True})  # fmt: skip
        parts = list(stream)
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == (
            chat.choices[0].message.content
        )
        assert parts[-1].usage.completion_tokens == 5
        assert [m.id for m in client.models.list().data] == [MODEL]

        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="x")
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x")


def test_disconnects_abort_and_failures_stay_isolated(engine):
    engine.step_s = 0.02
    with ServerThread(build_app(engine, disconnect_poll_s=0.02)) as srv:

        async def hang_up_streaming(client: httpx.AsyncClient) -> None:
            body = {"prompt": "a long story", "max_tokens": 80, "stream": True}
            async with client.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                assert r.status_code == 200
                n = 0
                async for line in r.aiter_lines():
                    n += line.startswith("data: ")
                    if n == 2:
                        return

        async def hang_up_waiting(client: httpx.AsyncClient) -> None:
            body = {"prompt": "another long story", "max_tokens": 80}
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"{srv.url}/v1/completions", json=body, timeout=0.3)

        async def complete(client: httpx.AsyncClient, i: int) -> int:
            body = {"prompt": f"short {i}", "max_tokens": 5}
            r = await client.post(f"{srv.url}/v1/completions", json=body)
            return r.status_code

        async def main():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(
                    hang_up_streaming(client),
                    hang_up_waiting(client),
                    *(complete(client, i) for i in range(4)),
                )

        results = asyncio.run(main())
        assert results[2:] == [200] * 4  # others are not disturbed
        assert wait_for(lambda: len(engine.aborted) == 2), engine.aborted
        long_ids = set(engine.started) - set(engine.finished)
        assert set(engine.aborted) == long_ids and len(long_ids) == 2

        text = httpx.get(f"{srv.url}/metrics").text
        samples = parse_prometheus_text(text)
        assert samples[("afd:request_aborted_total", M)] == 2
        assert samples[("afd:request_success_total", (("finished_reason", "length"), *M))] == 4


def test_failing_request_does_not_disturb_a_concurrent_one(tokenizer):
    class Flaky(FakeEngine):
        async def generate(self, request_id, prompt_token_ids, params):
            async for out in super().generate(request_id, prompt_token_ids, params):
                if params.max_tokens == 3 and len(out.outputs[0].token_ids) == 2:
                    raise RuntimeError("boom")
                yield out

    engine = Flaky(tokenizer, step_s=0.01)
    with TestClient(build_app(engine), raise_server_exceptions=False) as c:

        async def main():
            transport = httpx.ASGITransport(app=c.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await asyncio.gather(
                    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}),
                    client.post("/v1/completions", json={"prompt": "y", "max_tokens": 8}),
                )

        bad, good = asyncio.run(main())
    assert bad.status_code == 500 and "boom" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 8


# -- metrics -------------------------------------------------------------------------------------

SAMPLE_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? \S+$')


def test_metrics_page(client, tokenizer):
    for i in range(3):
        assert (
            client.post("/v1/completions", json={"prompt": f"m {i}", "max_tokens": 4}).status_code
            == 200
        )
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": -1})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for line in r.text.splitlines():
        assert line.startswith("# ") or SAMPLE_LINE.match(line), line
    s = parse_prometheus_text(r.text)
    prompt_tokens = sum(len(tokenizer.encode(f"m {i}")) for i in range(3))
    assert s[("afd:prompt_tokens_total", M)] == prompt_tokens
    assert s[("afd:generation_tokens_total", M)] == 12
    assert s[("afd:request_success_total", (("finished_reason", "length"), *M))] == 3
    assert s[("afd:time_to_first_token_seconds_count", M)] == 3
    assert s[("afd:inter_token_latency_seconds_count", M)] == 9
    assert s[("afd:e2e_request_latency_seconds_count", M)] == 3
    assert s[("afd:e2e_request_latency_seconds_bucket", (("le", "+Inf"), *M))] == 3
    assert s[("afd:kv_cache_usage_perc", M)] == 0.25
    assert s[("afd:num_requests_running", M)] == 0
    assert ("afd:num_requests_waiting", M) in s
    assert s[("afd:stage_seconds_total", (*M, ("stage", "expert")))] == 2.5
    assert s[("afd:stage_seconds_total", (*M, ("stage", "attention")))] == 1.5
    assert s[("afd:request_errors_total", (*M, ("status", "400")))] == 1
    # n = 3 choices are one request
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 3})
    s = parse_prometheus_text(client.get("/metrics").text)
    assert s[("afd:request_success_total", (("finished_reason", "length"), *M))] == 4
    assert s[("afd:e2e_request_latency_seconds_count", M)] == 4


def test_parse_prometheus_text_refuses_a_bad_page():
    with pytest.raises(ValueError):
        parse_prometheus_text("not a metric line at all {")


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
)
def test_lone_surrogate_model_is_a_400_counted_once(engine, path):
    """Issue 22: {"model": "\\ud800"} was a 500 (its 404 message could not be encoded), counted
    as both 404 and 500."""
    body = '{"model": "\\ud800", "prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}'
    with TestClient(build_app(engine), raise_server_exceptions=False) as c:
        r = c.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "model" and "UTF-8" in err["message"]
        assert err["type"] == "invalid_request_error"
        s = parse_prometheus_text(c.get("/metrics").text)
        errors = {k[1]: v for k, v in s.items() if k[0] == "afd:request_errors_total" and v}
    assert list(errors.values()) == [1] and ("status", "400") in next(iter(errors))

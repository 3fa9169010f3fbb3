"""Each router of afd.entrypoints.server alone, in a bare FastAPI app over a fake EngineClient
(no model): its routes answer, the other routers' do not, and what a route reads of the engine
goes through the EngineClient protocol."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from test_server import (
    MODEL,
    FakeEngine,
    engine,  # noqa: F401 (fixture)
    sse_events,
    tokenizer,  # noqa: F401 (fixture)
)

from afd.config import EngineConfig
from afd.engine.async_engine import AsyncEngine, EngineOverloadedError
from afd.entrypoints.metrics import parse_prometheus_text
from afd.entrypoints.protocol import EngineClient
from afd.entrypoints.server import (
    add_error_handlers,
    admin_router,
    openai_router,
    tokenizer_router,
)
from afd.entrypoints.serving import ServerConfig
from afd.entrypoints.serving_base import AppState

KEY = {"Authorization": "Bearer sk-k"}


def _app(router: APIRouter, client: EngineClient, **config) -> TestClient:
    app = FastAPI()
    app.state.afd = AppState.create(client, ServerConfig(**config))
    add_error_handlers(app)
    app.include_router(router)
    return TestClient(app)


def test_tokenizer_router_alone(engine, tokenizer):  # noqa: F811 (fixtures)
    c = _app(tokenizer_router, engine, api_key="sk-k")
    r = c.post("/tokenize", json={"prompt": "hello world"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = c.post("/tokenize", json={"prompt": "hello world"}, headers=KEY)
    ids = tokenizer.encode("hello world")
    assert r.status_code == 200 and r.json()["tokens"] == ids
    r = c.post("/detokenize", json={"tokens": ids}, headers=KEY)
    assert r.json() == {"prompt": "hello world"}
    # off: a 404 before the key is asked for
    r = c.get("/tokenizer_info")
    assert r.status_code == 404 and "--enable-tokenizer-info-endpoint" in r.text
    # another router's route is not served by this one
    r = c.post("/v1/completions", json={"prompt": "x"}, headers=KEY)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_admin_router_reads_the_engine_through_the_protocol(engine):  # noqa: F811
    class Recovering(FakeEngine):
        def failure_stats(self) -> dict:
            return {"worker_restarts": {"expert": 2}, "requests_recomputed": 3,
                    "nodes_lost": {"1": 1}}  # fmt: skip

    engine = Recovering(engine.tokenizer)
    engine.model_root = "/models/fake-moe"
    engine.healthy = (True, "recovering: expert worker 1")
    c = _app(admin_router, engine)
    r = c.get("/health")
    assert r.json() == {"status": "recovering", "reason": "recovering: expert worker 1"}
    (card,) = c.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["root"] == "/models/fake-moe"
    assert c.get(f"/v1/models/{MODEL}").json() == card
    s = parse_prometheus_text(c.get("/metrics").text)
    m = ("model_name", MODEL)
    assert s[("afd:worker_restarts_total", (m, ("role", "expert")))] == 2
    assert s[("afd:requests_recomputed_total", (m,))] == 3
    assert s[("afd:nodes_lost_total", (m, ("node", "1")))] == 1
    engine.healthy = (False, "restart budget spent")
    assert c.get("/health").status_code == 503
    assert c.post("/tokenize", json={"prompt": "x"}).status_code == 404


def test_openai_router_alone_completions_and_chat_apart(engine, tokenizer):  # noqa: F811
    c = _app(openai_router, engine)
    r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == engine.expected_text(tokenizer.encode("hi"), 3)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}
    events = sse_events(c.post("/v1/chat/completions", json={**chat, "stream": True}).text)
    assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    role = {"role": "assistant", "content": ""}
    assert [ch["delta"] for ch in events[0]["choices"]] == [role, role]
    assert c.get("/health").status_code == 404


def test_sequence_capacity_and_overload_come_from_the_engine(engine):  # noqa: F811
    class Full(FakeEngine):
        async def generate(self, request_id, prompt_token_ids, params):
            raise EngineOverloadedError("the server is at capacity")
            yield  # an async generator, as the protocol says

    engine.sequence_capacity = 2
    c = _app(openai_router, engine)
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert c.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 200
    r = _app(openai_router, Full(engine.tokenizer)).post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_async_engine_is_an_engine_client():
    real = AsyncEngine(EngineConfig.from_flat(model="tiny-qwen3-moe", dtype="float32"),
                       max_queue_len=5)  # fmt: skip
    try:
        assert isinstance(real, EngineClient)
        assert isinstance(real.config, EngineConfig) and real.model_root == "tiny-qwen3-moe"
        assert real.sequence_capacity == 5 + real.config.limits.max_num_seqs
        assert set(real.failure_stats()) >= {"worker_restarts", "requests_recomputed"}
    finally:
        real.shutdown()

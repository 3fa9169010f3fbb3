"""GET /openapi.json and /docs: behind the API key like the other routes, documenting the
request models the POST routes accept; schemathesis drives every operation in-process (ASGI)
over the fake engine and no answer is a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from test_server import (
    FakeEngine,
    engine,  # noqa: F401 (fixture)
    tokenizer,  # noqa: F401 (fixture)
)

from afd.entrypoints.protocol import CompletionRequest
from afd.entrypoints.server import REQUEST_MODELS, build_app

KEY = {"Authorization": "Bearer sk-docs"}
POSTS = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}


def test_openapi_and_docs_need_the_key(engine):  # noqa: F811
    with TestClient(build_app(engine, api_key="sk-docs")) as c:
        for path in ("/openapi.json", "/docs"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert "swagger-ui" in c.get("/docs", headers=KEY).text
        schema = c.get("/openapi.json", headers=KEY).json()
    # the pages describe the API, not themselves
    assert "/openapi.json" not in schema["paths"] and "/docs" not in schema["paths"]


def test_openapi_documents_the_request_models(engine):  # noqa: F811
    with TestClient(build_app(engine)) as c:
        schema = c.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, name in POSTS.items():
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert {m.__name__ for m in REQUEST_MODELS} <= set(components)
    assert set(components["CompletionRequest"]["properties"]) == set(CompletionRequest.model_fields)
    # nested models resolve inside the document
    assert "StreamOptions" in components and "ResponseFormat" in components


@pytest.fixture
def api_schema(tokenizer):  # noqa: F811
    return schemathesis.openapi.from_asgi("/openapi.json", build_app(FakeEngine(tokenizer)))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # seeded: the same examples on every run
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_5xx(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)

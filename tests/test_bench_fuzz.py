"""`afd bench fuzz`'s schemas: `model` pinned to the served name everywhere, and the generate
run's examples reach generation (against the fake engine behind uvicorn)."""

from __future__ import annotations

from test_server import (
    FakeEngine,
    ServerThread,
    tokenizer,  # noqa: F401 (fixture)
)

from afd.benchmarks.fuzz import fuzz_all, generating, pin_model
from afd.entrypoints.server import build_app

DOC = {
    "paths": {"/v1/models/{model}": {"get": {"parameters": [{"name": "model", "schema": {}}]}}},
    "components": {"schemas": {"CompletionRequest": {"properties": {"model": {}, "n": {}}}}},
}


def test_pin_model_pins_bodies_and_path_parameters_in_a_copy():
    pinned = pin_model(DOC, "m")
    assert pinned["components"]["schemas"]["CompletionRequest"]["properties"]["model"] == {
        "enum": ["m"]
    }
    assert pinned["paths"]["/v1/models/{model}"]["get"]["parameters"][0]["schema"] == {
        "enum": ["m"]
    }
    assert DOC["components"]["schemas"]["CompletionRequest"]["properties"]["model"] == {}
    narrowed = generating(DOC, "m")["components"]["schemas"]["CompletionRequest"]
    assert narrowed["required"] == ["prompt", "max_tokens"] and "n" in narrowed["properties"]


def test_the_generate_run_reaches_generation_and_nothing_is_a_5xx(tokenizer):  # noqa: F811
    engine = FakeEngine(tokenizer)
    with ServerThread(build_app(engine)) as srv:
        report = fuzz_all(srv.url, max_examples=20, seed=0)
    runs = report["POST /v1/completions"]
    assert runs["generate"]["examples"] == 20
    assert runs["generate"]["status_codes"].get("200", 0) >= 16, runs["generate"]
    assert runs["positive"]["status_codes"].get("200", 0) < 16  # the served schema's examples
    assert len(engine.finished) >= 16  # the engine ran them
    assert all(r["server_errors"] == 0 for runs in report.values() for r in runs.values())

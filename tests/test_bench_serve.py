from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from afd.benchmarks import serve

TOKEN_DELAY_S = 0.004
PREFILL_DELAY_S = 0.02


class FakeOpenAIServer:
    """A loopback OpenAI-style streaming server: one chunk per token, with small delays."""

    def __init__(self, fail_request: int | None = None):
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

        async def stream(body: dict, chat: bool):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(PREFILL_DELAY_S)
                n = body["max_tokens"]
                for i in range(n):
                    if i:
                        await asyncio.sleep(TOKEN_DELAY_S)
                    choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
                    choice |= {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
                    yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                prompt = body["messages"][0]["content"] if chat else body["prompt"]
                used = {"prompt_tokens": len(prompt.split()), "completion_tokens": n}
                yield f"data: {json.dumps({'choices': [], 'usage': used})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        async def handle(request: Request, chat: bool):
            body = await request.json()
            self.requests.append(body)
            if fail_request is not None and len(self.requests) == fail_request:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
            return StreamingResponse(stream(body, chat), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await handle(request, chat=True)

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> FakeOpenAIServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_parse_goodput_and_workload():
    assert serve.parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    for bad in (["ttft"], ["latency:5"], ["ttft:abc"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            serve.parse_goodput(bad)
    a = serve.random_requests(5, 20, 8, 0.5, seed=3)
    assert a == serve.random_requests(5, 20, 8, 0.5, seed=3)
    assert a != serve.random_requests(5, 20, 8, 0.5, seed=4)
    assert all(10 <= s.prompt_words <= 30 and 4 <= s.max_tokens <= 12 for s in a)
    assert all(len(s.prompt.split()) == s.prompt_words for s in a)


def test_bench_serve_completions(tmp_path, capsys):
    result_file = tmp_path / "out" / "serve.json"
    n, out_len, in_len = 8, 5, 12
    with FakeOpenAIServer() as server:
        args = _args(
            "--base-url", server.url,
            "--num-prompts", str(n),
            "--random-input-len", str(in_len),
            "--random-output-len", str(out_len),
            "--max-concurrency", "3",
            "--goodput", "ttft:10000", "tpot:10000",
            "--result-file", str(result_file),
        )  # fmt: skip
        assert serve.run(args) == 0
        assert server.max_in_flight <= 3
        body = server.requests[0]
    assert body["model"] == "fake-model"  # picked from /v1/models
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == out_len
    assert body["stream_options"] == {"include_usage": True}
    m = json.loads(result_file.read_text())
    assert m["completed"] == n and m["failed"] == 0 and m["errors"] == []
    assert m["total_output_tokens"] == n * out_len
    assert m["total_input_tokens"] == n * in_len
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert m["total_token_throughput"] > m["output_throughput"] > 0
    assert m["output_throughput"] == pytest.approx(n * out_len / m["duration"])
    for key in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert math.isfinite(m[f"{stat}_{key}_ms"]) and m[f"{stat}_{key}_ms"] >= 0
    assert PREFILL_DELAY_S * 1000 * 0.9 <= m["mean_ttft_ms"] <= m["mean_e2el_ms"]
    assert m["p99_ttft_ms"] <= m["p99_e2el_ms"]
    assert m["mean_tpot_ms"] >= TOKEN_DELAY_S * 1000 * 0.5
    assert m["mean_itl_ms"] >= TOKEN_DELAY_S * 1000 * 0.5
    # with 3 in flight and 8 requests, the run takes at least three rounds of one request
    one_request_s = PREFILL_DELAY_S + (out_len - 1) * TOKEN_DELAY_S
    assert m["duration"] >= 3 * one_request_s * 0.9
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Request goodput" in table


def test_bench_serve_chat_failures_and_rate():
    n = 6
    with FakeOpenAIServer(fail_request=2) as server:
        args = _args(
            "--base-url", server.url + "/",
            "--endpoint", "/v1/chat/completions",
            "--model", "chosen",
            "--num-prompts", str(n),
            "--random-input-len", "4",
            "--random-output-len", "3",
            "--request-rate", "200",
            "--burstiness", "0.5",
            "--goodput", "ttft:0",
            "--seed", "7",
        )  # fmt: skip
        m = asyncio.run(serve.benchmark(args))
        assert all(r["model"] == "chosen" and "messages" in r for r in server.requests)
    assert m["completed"] == n - 1 and m["failed"] == 1
    assert "503" in m["errors"][0] and "overloaded" in m["errors"][0]
    assert m["total_output_tokens"] == (n - 1) * 3
    assert m["request_goodput"] == 0.0  # no request can reach its first token in 0 ms
    assert m["request_rate"] == 200 and m["burstiness"] == 0.5


def test_unreachable_server_fails_requests_not_the_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    args = _args(
        "--base-url", f"http://127.0.0.1:{port}",
        "--model", "m",
        "--num-prompts", "3",
        "--random-output-len", "2",
        "--request-timeout", "5",
    )  # fmt: skip
    m = asyncio.run(serve.benchmark(args))
    assert m["completed"] == 0 and m["failed"] == 3 and len(m["errors"]) == 3
    assert serve.run(args) == 1
    with pytest.raises(ValueError, match="cannot list models"):
        asyncio.run(serve.benchmark(_args("--base-url", f"http://127.0.0.1:{port}")))


def _synthetic_run():
    """Four finished requests and one failed one, with hand-picked timestamps (seconds)."""
    R = serve.RequestResult
    results = [
        R(True, prompt_tokens=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        R(True, prompt_tokens=0, output_tokens=3, ttft=0.3, latency=0.5, itl=[0.05, 0.15]),
        R(True, prompt_tokens=10, output_tokens=5, ttft=0.2, latency=1.4, itl=[0.3] * 4),
        R(True, prompt_tokens=10, output_tokens=1, ttft=0.05, latency=0.05),
        R(False, error="HTTP 503: overloaded"),
    ]
    specs = [serve.RequestSpec("w " * 7, 7, 5) for _ in results]
    return specs, results


def test_latency_metrics_exact_values():
    """vLLM's definitions on exact inputs: TPOT = (E2EL - TTFT) / (output tokens - 1) per request
    with more than one token; ITL pools every gap; failed requests count nowhere."""
    specs, results = _synthetic_run()
    m = serve.compute_metrics(specs, results, 2.0, {}, [50.0, 99.0])
    approx = pytest.approx
    assert (m["completed"], m["failed"], m["errors"]) == (4, 1, ["HTTP 503: overloaded"])
    assert m["total_input_tokens"] == 10 + 7 + 10 + 10  # word count where usage had none
    assert m["total_output_tokens"] == 14
    assert m["request_throughput"] == approx(2.0) and m["output_throughput"] == approx(7.0)
    assert m["total_token_throughput"] == approx((37 + 14) / 2.0)
    assert m["request_goodput"] is None  # no SLOs given
    # TPOT per request: 0.4 / 4, 0.2 / 2, 1.2 / 4; the one-token request has none
    assert m["mean_tpot_ms"] == approx(500 / 3)
    assert m["median_tpot_ms"] == approx(100.0)
    assert m["p99_tpot_ms"] == approx(100 + 0.98 * 200)  # numpy's linear interpolation
    assert m["std_tpot_ms"] == approx(float(np.std([100.0, 100.0, 300.0])))
    # ITL: ten gaps
    assert m["mean_itl_ms"] == approx(180.0)
    assert m["median_itl_ms"] == approx(125.0)
    assert m["p99_itl_ms"] == approx(300.0)
    assert m["mean_ttft_ms"] == approx(162.5) and m["median_ttft_ms"] == approx(150.0)
    assert m["mean_e2el_ms"] == approx(612.5) and m["median_e2el_ms"] == approx(500.0)
    assert m["p50_e2el_ms"] == approx(500.0)


@pytest.mark.parametrize(
    "slos,good",
    [
        ({"ttft": 150.0}, 2),  # 100 and 50 ms pass; 300, 200 ms fail
        ({"tpot": 150.0}, 3),  # 100, 100 and the one-token request pass; 300 ms fails
        ({"e2el": 600.0}, 3),  # 500, 500, 50 pass; 1400 fails
        ({"ttft": 250.0, "tpot": 150.0, "e2el": 600.0}, 2),  # every SLO must hold
        ({"ttft": 1000.0, "tpot": 1000.0, "e2el": 2000.0}, 4),
        ({"ttft": 0.0}, 0),
    ],
)
def test_goodput_exact_values(slos, good):
    specs, results = _synthetic_run()
    m = serve.compute_metrics(specs, results, 2.0, slos, [99.0])
    assert m["request_goodput"] == pytest.approx(good / 2.0)

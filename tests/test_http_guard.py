"""The HTTP layer no client can stall (afd.entrypoints.serving), against the fake engine on real
uvicorn: body limit, header and body deadlines, hostile JSON, exact Bearer auth, X-Request-Id,
request log lines, draining and aborting at shutdown, tokenize endpoints, admission."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_server import MAX_MODEL_LEN, MODEL, FakeEngine, sse_events, wait_for

from afd.comm.net import listen_socket
from afd.entrypoints.server import build_app
from afd.entrypoints.serving import ServerConfig, ServerState, make_server


class Served:
    """build_app + make_server (what `afd serve` runs) on a free loopback port, in a thread."""

    def __init__(self, engine, **settings):
        self.config = ServerConfig(**settings)
        self.state = ServerState()
        app = build_app(engine, self.config, state=self.state, disconnect_poll_s=0.02)
        self.server = make_server(app, self.config, self.state, "error")
        self.sock = listen_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Served:
        self.thread.start()
        assert wait_for(lambda: self.server.started, 10), "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        assert not self.thread.is_alive()


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from afd.builtin import train_bytelevel_bpe
    from afd.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_bytelevel_bpe(path, 512)
    return Tokenizer.from_pretrained(path)


def _stream_gaps(url: str, gaps: list[float], started: threading.Event) -> None:
    body = {"prompt": "a stream", "max_tokens": 80, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        last = None
        for line in r.iter_lines():
            if line.startswith("data: "):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
                started.set()


def test_50mb_body_gets_413_within_1s_while_a_stream_keeps_its_pace(engine, bound):
    engine.step_s = 0.02
    with Served(engine, max_body_bytes=2**20) as srv:
        gaps: list[float] = []
        started = threading.Event()
        stream = threading.Thread(target=_stream_gaps, args=(srv.url, gaps, started))
        stream.start()
        assert started.wait(10)
        before = len(gaps)
        # a client that announces 50 MB (the answer comes before a byte of it is read)
        c = socket.create_connection(("127.0.0.1", srv.port))
        t0 = time.monotonic()
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 52428800\r\n\r\n")  # fmt: skip
        c.settimeout(5)
        head = c.recv(65536)
        elapsed = time.monotonic() - t0
        while chunk := c.recv(65536):  # the body follows; then the server closes
            head += chunk
        head = head.decode()
        c.close()
        # the same without Content-Length: counted while it arrives
        chunked = httpx.post(f"{srv.url}/v1/completions", content=iter([b" " * 2**16] * 800),
                             headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
        stream.join(30)
    assert head.startswith("HTTP/1.1 413"), head
    assert "request_too_large" in head and "connection: close" in head.lower()
    assert elapsed < bound(1.0)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    during = gaps[before:]
    assert during and max(during) < bound(0.5), during  # 20 ms a token; never a stall


def test_200_half_sent_requests_are_closed_by_the_header_timeout(engine):
    with Served(engine, header_timeout_s=1.0) as srv:
        socks = []
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", srv.port))
            # a request line and part of the headers (slowloris), or nothing at all
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n" if i % 2 else b""
            )
            socks.append(s)
        t0 = time.monotonic()
        closed = 0
        for s in socks:
            s.settimeout(max(0.1, 5 - (time.monotonic() - t0)))
            try:
                closed += s.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                pass
            s.close()
        assert closed == 200
        assert len(srv.server.server_state.connections) == 0
        # a request sent in time on a fresh connection is served
        assert httpx.get(f"{srv.url}/health").status_code == 200


def test_body_deadline_408_and_giant_headers_refused(engine):
    with Served(engine, body_timeout_s=0.5) as srv:
        c = socket.create_connection(("127.0.0.1", srv.port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        c.settimeout(5)
        head = b""
        while chunk := c.recv(65536):  # the server closes the connection after the answer
            head += chunk
        head = head.decode()
        c.close()
        assert head.startswith("HTTP/1.1 408") and "request_timeout" in head
        big = {"X-Big": "a" * 100_000}
        r = httpx.get(f"{srv.url}/health", headers=big)
        assert r.status_code == 431
        # a head that trickles in beyond h11's buffer is cut off by uvicorn
        c = socket.create_connection(("127.0.0.1", srv.port))
        c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        c.settimeout(5)
        answer = b""
        try:
            for _ in range(64):
                c.sendall(b"a" * 1024)
                time.sleep(0.002)
            answer = c.recv(100)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: refused all the same
        c.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
        assert httpx.get(f"{srv.url}/health").status_code == 200


@pytest.mark.parametrize(
    "body,words",
    [
        ('{"prompt": "hi", "max_tokens": 1' + "0" * 5000 + "}", "max_tokens"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper than 64"),
        ('{"prompt": "hi", "guided_json": ' + '{"a": ' * 70 + "1" + "}" * 70 + "}", "nests"),
        ('{"prompt": "hi", "seed": -1' + "0" * 200 + "}", "seed"),
        (b'{"prompt": "\xff"}', "not valid UTF-8"),
    ],
)
def test_hostile_json_is_a_400_and_the_connection_stays_usable(client, body, words):
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


@pytest.fixture
def client(engine):
    with TestClient(build_app(engine, api_key="sk-k", protect_metrics=True)) as c:
        c.headers["Authorization"] = "Bearer sk-k"
        yield c


@pytest.mark.parametrize(
    "headers,status",
    [
        ([("Authorization", "Bearer sk-k")], 200),
        ([("Authorization", "bearer sk-k")], 401),
        ([("Authorization", "BEARER sk-k")], 401),
        ([("Authorization", "Bearer  sk-k")], 401),
        ([("Authorization", "Bearer sk-k2")], 401),
        ([("Authorization", "Bearer sk-")], 401),
        ([("Authorization", "Bearer sk-k"), ("Authorization", "Bearer wrong")], 401),
        ([("Authorization", "Bearer wrong"), ("Authorization", "Bearer sk-k")], 401),
        ([("Authorization", "Bearer sk-k"), ("Authorization", "Bearer sk-k")], 200),
        ([], 401),
    ],
)
def test_bearer_auth_is_exact_on_every_header(engine, headers, status):
    import http.client

    with Served(engine, api_key="sk-k", protect_metrics=True) as srv:
        for path in ("/v1/models", "/metrics"):
            # http.client sends repeated headers as they are (httpx would join them)
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
            conn.putrequest("GET", path)
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            got = conn.getresponse().status
            conn.close()
            assert got == status, (path, headers)
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key
        assert httpx.get(f"{srv.url}/version").status_code == 200


def test_request_ids_and_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="afd.request"):
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                        headers={"X-Request-Id": "client-42"})  # fmt: skip
        assert r.headers["x-request-id"] == "client-42"
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.headers["x-request-id"] == r.json()["id"]
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1},
                          headers={"X-Request-Id": "has space"})  # fmt: skip
        assert bad.status_code == 400 and bad.headers["x-request-id"].startswith("req-")
        long = client.get("/v1/models", headers={"X-Request-Id": "a" * 500})
        assert len(long.headers["x-request-id"]) < 100
        client.get("/health")  # a probe: debug level
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "afd.request"]
    assert len(lines) == 4, lines
    assert lines[0].startswith("client-42 ") and '"POST /v1/completions" 200' in lines[0]
    assert "prompt_tokens=1 completion_tokens=2" in lines[0]
    assert "completion_tokens=3" in lines[1] and " 400 " in lines[2]


def test_disable_log_requests(engine, caplog):
    with TestClient(build_app(engine, log_requests=False)) as c, caplog.at_level(logging.DEBUG):
        c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert not [r for r in caplog.records if r.name == "afd.request"]


def test_tokenize_detokenize_version_and_model_aliases(engine, tokenizer):
    with TestClient(build_app(engine, served_model_names=["alias", MODEL])) as c:
        r = c.post("/tokenize", json={"model": "alias", "prompt": "hello world",
                                      "return_token_strs": True})  # fmt: skip
        body = r.json()
        assert body["tokens"] == tokenizer.encode("hello world")
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
        assert "".join(body["token_strs"]).replace("Ġ", " ") == "hello world"
        back = c.post("/detokenize", json={"tokens": body["tokens"]}).json()
        assert back == {"prompt": "hello world"}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        want = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert chat.json()["tokens"] == tokenizer.encode(want, add_special_tokens=False)
        for bad in ({"tokens": [10**6]}, {"tokens": [-1]}, {"tokens": "x"}):
            assert c.post("/detokenize", json=bad).status_code == 400
        assert c.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400
        assert c.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
        assert c.get("/version").json()["version"]
        cards = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in cards] == ["alias", MODEL]
        assert all(m["max_model_len"] == MAX_MODEL_LEN and m["root"] == MODEL for m in cards)
        for name in ("alias", MODEL):
            r = c.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == "alias"  # the first is reported
        assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_a_huge_prompt_under_the_body_limit_is_refused_before_it_is_encoded(
    client, tokenizer, monkeypatch
):
    calls = []
    for owner in (tokenizer.backend, tokenizer.hf):  # the length probe's encode, the full one
        encode = owner.encode
        counted = lambda text, *a, _encode=encode, **kw: (
            calls.append(len(text)) or _encode(text, *a, **kw)
        )
        monkeypatch.setattr(owner, "encode", counted)
    r = client.post("/v1/completions", json={"prompt": "hello " * 1_000_000})
    messages = [{"role": "user", "content": "hi " * 10**6}]
    chat = client.post("/v1/chat/completions", json={"messages": messages})
    monkeypatch.undo()
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert all(n < 10_000 for n in calls), calls  # never the whole 6 MB


def test_draining_refuses_new_requests_and_the_deadline_aborts_running_ones(engine):
    engine.step_s = 0.02
    produced: list[str] = []  # a request id per output the engine gave the server
    generate = engine.generate

    async def counted(*args, **kwargs):
        async for out in generate(*args, **kwargs):
            produced.append(out.request_id)
            yield out

    engine.generate = counted
    state = ServerState()
    with TestClient(build_app(engine, state=state, disconnect_poll_s=0.02)) as c:

        async def main():
            transport = httpx.ASGITransport(app=c.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                plain = asyncio.create_task(
                    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 80})
                )
                body = {"prompt": "y", "max_tokens": 80, "stream": True}
                stream = asyncio.create_task(client.post("/v1/completions", json=body))
                deadline = time.monotonic() + 10
                # both run, and the server took a second output of each: the stream's first
                # event is out (so its end must be an error event, not a plain 503)
                while len(set(produced)) < 2 or min(map(produced.count, set(produced))) < 2:
                    assert time.monotonic() < deadline, produced
                    await asyncio.sleep(0.01)
                state.draining = True
                refused = await client.post("/v1/completions", json={"prompt": "z"})
                health = await client.get("/health")
                # draining alone ends nothing: both still run until the deadline
                assert not plain.done() and not stream.done() and not engine.aborted
                state.abort_in_flight = True
                return refused, health, await plain, await stream

        refused, health, plain, stream = asyncio.run(main())
    assert refused.status_code == 503 and health.status_code == 200
    assert plain.status_code == 503 and "shut down" in plain.json()["error"]["message"]
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "service_unavailable"
    assert wait_for(lambda: len(engine.aborted) == 2), engine.aborted


def test_a_non_streaming_request_is_aborted_when_its_client_leaves_while_tokens_flow(engine):
    engine.step_s = 0.002  # tokens come faster than the disconnect poll
    with Served(engine) as srv:
        body = json.dumps({"prompt": "x", "max_tokens": 90}).encode()
        c = socket.create_connection(("127.0.0.1", srv.port))
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body)  # fmt: skip
        assert wait_for(lambda: engine.started, 5)
        c.close()
        assert wait_for(lambda: engine.aborted, 5)
    assert engine.finished == []


def test_requests_beyond_the_sequence_capacity_are_refused(engine):
    engine.sequence_capacity = 6
    with TestClient(build_app(engine)) as c:
        ok = c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 3, "max_tokens": 1})
        big = c.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})
    assert ok.status_code == 200
    assert big.status_code == 400 and "9 sequences" in big.json()["error"]["message"]

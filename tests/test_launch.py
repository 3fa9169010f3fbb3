"""`afd launch` end to end: the official openai client against a real cluster process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port, launched, stop
from test_server import wait_for

from afd import LLM, SamplingParams
from afd.entrypoints.metrics import parse_prometheus_text

M = (("model_name", "tiny-qwen3-moe"),)  # the first served name labels every metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    args = ["--dtype", "float32", "--num-micro-batches", "2", "--max-model-len", "256",
            "--api-key", "sk-test", "--served-model-name", "tiny-qwen3-moe", "alias"]  # fmt: skip
    with launched(*args) as (base, proc):
        yield base, proc


def test_startup_line_names_the_transport_auto_chose(server):
    _, proc = server
    plan = next(line for line in proc.lines if line.startswith("afd: plan:"))
    assert "transport=shm (auto)" in plan, plan


def test_one_flag_serves_colocated():
    """`afd serve M --num-attention-workers 0` alone: no worker processes (only the engine-core
    process, the default since issue 19), the offline engine's greedy text."""
    with launched("tiny-qwen3-moe", "--num-attention-workers", "0", "--dtype", "float32",
                  serve=True) as (base, proc):  # fmt: skip
        assert any("plan: single process" in line for line in proc.lines), proc.lines
        body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        (core,) = children.stdout.split()  # the engine core, and no worker below it
        assert "afd.engine.core" in Path(f"/proc/{core}/cmdline").read_text()
        grandchildren = subprocess.run(["pgrep", "-P", core], capture_output=True, text=True)
        assert grandchildren.stdout.split() == []
    want = LLM("tiny-qwen3-moe", dtype="float32").generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert got["choices"][0]["text"] == want[0].outputs[0].text


def test_openai_client_matches_offline(server):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test")
    offline = LLM("tiny-qwen3-moe", dtype="float32")
    want = offline.generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    )
    r = client.completions.create(
        model="tiny-qwen3-moe",
        prompt="Hello there",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == want[0].outputs[0].text
    assert r.usage.completion_tokens == 12
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-qwen3-moe",
            prompt="Hello there",
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert streamed == want[0].outputs[0].text
    msgs = [{"role": "user", "content": "Hi!"}]
    [chat_want] = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    c = client.chat.completions.create(
        model="tiny-qwen3-moe",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert c.choices[0].message.content == chat_want.outputs[0].text
    parts = client.chat.completions.create(
        model="tiny-qwen3-moe",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert (
        "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        == chat_want.outputs[0].text
    )
    assert client.models.list().data[0].id == "tiny-qwen3-moe"


@pytest.mark.parametrize(
    "body,status",
    [
        ("{not json", 400),
        ({"prompt": "hi", "max_tokens": -3}, 400),
        ({"prompt": "hi", "max_tokens": "ten"}, 400),
        ({"prompt": 5}, 400),
        ({"prompt": "hi", "model": "nope"}, 404),
        ({"prompt": [7] * 300}, 400),
        ({"prompt": "hi", "temperature": -1}, 400),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status):
    base, _ = server
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else None
    r = httpx.post(
        f"{base}/v1/completions",
        headers=headers,
        content=content,
        json=None if content else body,
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_wrong_api_key_and_metrics(server):
    base, _ = server
    r = httpx.post(
        f"{base}/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer x"}
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    text = httpx.get(f"{base}/metrics").text
    for name in (
        "afd:time_to_first_token_seconds",
        "afd:num_requests_running",
        "afd:kv_cache_usage_perc",
        "afd:e2e_request_latency_seconds",
        "afd:request_queue_time_seconds_count",
        "afd:request_prefill_time_seconds_count",
        "afd:request_decode_time_seconds_count",
        "afd:num_preemptions_total",
        "afd:prefix_cache_hits_total",
    ):
        assert name in text, name
    samples = parse_prometheus_text(text)
    assert (("afd:stage_seconds_total"), (*M, ("stage", "expert"))) in samples


def _metric(base: str, name: str) -> float:
    return parse_prometheus_text(httpx.get(f"{base}/metrics").text)[(f"afd:{name}", M)]


def test_64_concurrent_streams_half_disconnect_leak_nothing(server):
    import asyncio

    base, _ = server
    idle = _metric(base, "kv_cache_usage_perc")
    headers = {"Authorization": "Bearer sk-test"}

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"request number {i}", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        chunks = 0
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if i % 2 and chunks == 2:
                        return -1  # hang up mid-stream
                    if line == "data: [DONE]":
                        return chunks
        return chunks

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert all(r > 1 for r in results[0::2]) and all(r == -1 for r in results[1::2])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (
            _metric(base, "num_requests_running") == 0
            and _metric(base, "num_requests_waiting") == 0
        ):
            break
        time.sleep(0.2)
    assert _metric(base, "num_requests_running") == 0
    assert _metric(base, "kv_cache_usage_perc") == idle


def worker_pid(proc, role: str) -> int:
    from afd.benchmarks.chaos import worker_pid as from_lines

    pid = from_lines(proc.lines, role)
    assert pid is not None, f"no {role} worker in the launcher's output"
    return pid


HOSTILE = [  # (body, expected status): issue 10's inputs and their neighbours
    ({"prompt": "Hello", "max_tokens": 2, "temperature": 1e-300}, 200),
    ({"prompt": "Hello", "max_tokens": 2, "temperature": 1e-39}, 200),
    ({"prompt": "Hello", "max_tokens": 2, "temperature": 5e-324}, 200),
    ({"prompt": "Hello", "max_tokens": 2, "top_p": 1e-300, "top_k": 2**63 - 1}, 200),
    ({"prompt": "Hello", "max_tokens": 2, "top_k": 18446744073709551616}, 400),
    ({"prompt": "Hello", "max_tokens": 2, "top_k": -7}, 400),
    ({"prompt": "Hello", "max_tokens": 2, "seed": 2**64}, 400),
    ({"prompt": "Hello", "max_tokens": 2, "seed": -(2**63), "temperature": 0.5}, 200),
    ({"prompt": "Hello", "max_tokens": 2, "n": 10**9}, 400),
    ({"prompt": "Hello", "max_tokens": 2**64}, 400),
    ({"prompt": "Hello", "logprobs": 2**64}, 400),
    ({"prompt": [2**64]}, 400),
    ('{"prompt": "Hello", "temperature": NaN}', 400),
    ('{"prompt": "Hello", "top_p": Infinity}', 400),
    (r'{"prompt": "Hello\ud800"}', 400),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
      "temperature": 1e-300}, 200),
]  # fmt: skip


def test_hostile_inputs_and_a_killed_worker_leave_8_streams_unaffected(server):
    """While 8 greedy streams run: every hostile input gets a 200 or an OpenAI-shaped 400, the
    expert worker is SIGKILLed and replaced, /health stays 200, and every stream's text equals
    the offline engine's."""
    import asyncio

    base, proc = server
    headers = {"Authorization": "Bearer sk-test"}
    prompts = [f"stream number {i}" for i in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM("tiny-qwen3-moe", dtype="float32").generate(prompts, sp)]
    health: list[int] = []
    stop = threading.Event()

    def watch_health():
        while not stop.is_set():
            health.append(httpx.get(f"{base}/health", timeout=10).status_code)
            time.sleep(0.1)

    async def stream(client, prompt: str, started: list) -> str:
        body = {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        text = ""
        async with client.stream("POST", f"{base}/v1/completions", json=body,
                                 headers=headers) as r:  # fmt: skip
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
                started.append(1)
        return text

    async def hostile(client, body, status: int):
        path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = await client.post(f"{base}{path}", headers={**headers, "Content-Type":
                              "application/json"}, **kw)  # fmt: skip
        assert r.status_code == status, (body, r.text)
        if status == 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    async def main():
        started: list = []
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [asyncio.create_task(stream(client, p, started)) for p in prompts]
            while len(started) < 16:
                await asyncio.sleep(0.02)
            os.kill(worker_pid(proc, "expert"), signal.SIGKILL)
            await asyncio.gather(*(hostile(client, b, s) for b, s in HOSTILE))
            return await asyncio.gather(*streams)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        texts = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    assert texts == want
    assert health and set(health) == {200}
    text = httpx.get(f"{base}/metrics").text
    samples = parse_prometheus_text(text)
    assert samples[("afd:worker_restarts_total", (*M, ("role", "expert")))] == 1
    assert samples[("afd:recovery_seconds_count", M)] == 1
    assert any("recovered in" in line for line in proc.lines)


def _worker_pids(launcher: int) -> list[int]:
    """The processes the engine started: the engine core's children (the launcher's only
    child by default), or the launcher's own under --no-engine-core-process."""
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    cores = [p for p in pids if "afd.engine.core" in Path(f"/proc/{p}/cmdline").read_text()]
    if cores:
        out = subprocess.run(["pgrep", "-P", str(cores[0])], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]
    return pids


def test_killed_worker_makes_health_503_and_requests_fail():
    """Restart budget spent (--max-worker-restarts 0): the old fail-fast behaviour."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "afd", "launch", "--port", str(port), "--dtype", "float32",
         "--max-worker-restarts", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        workers = _worker_pids(proc.pid)
        assert len(workers) >= 2
        import threading

        in_flight = {}

        def long_request():
            body = {"prompt": "hi", "max_tokens": 1500, "ignore_eos": True}
            in_flight["r"] = httpx.post(f"{base}/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        assert wait_for(lambda: _metric(base, "num_requests_running") == 1, 30), "not running"
        os.kill(workers[-1], signal.SIGKILL)
        t.join(timeout=15)
        assert not t.is_alive(), "in-flight request hangs after a worker died"
        assert in_flight["r"].status_code >= 500 and in_flight["r"].json()["error"]["message"]
        assert wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 503, 10)
        r = httpx.get(f"{base}/health", timeout=5)
        assert r.status_code == 503 and "worker" in r.text
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=15)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert proc.wait(timeout=30) == 1  # the launcher gives up and says so
    finally:
        stop(proc)
    left = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_config_file_sets_defaults_and_flags_win(tmp_path, capsys):
    from afd.entrypoints.cli import build_parser, main
    from afd.entrypoints.launch import apply_config_file

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("num-attention-workers: 2\nnum_expert_workers: 3\nport: 9001\n")
    parser = build_parser()
    launch = parser._subparsers._group_actions[0].choices["launch"]
    argv = ["--config", str(cfg), "--port", "9002"]
    apply_config_file(launch, argv)
    args = parser.parse_args(["launch", *argv])
    assert (args.num_attention_workers, args.num_expert_workers, args.port) == (2, 3, 9002)
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    assert main(["launch", "--config", str(bad)]) == 2
    assert "unknown setting 'no_such_flag'" in capsys.readouterr().err


def start_two_nodes(tmp_path, *extra: str):
    """Node 1 (expert worker) and node 0 (the rest and the API) on loopback, once /health is 200;
    each started in its own session so a test can kill a whole node."""
    init = f"127.0.0.1:{free_port()}"
    port = free_port()
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    common = ["--nnodes", "2", "--dist-init-addr", init, "--dtype", "float32",
              "--cluster-secret-file", str(secret), *extra]  # fmt: skip
    launch = [sys.executable, "-m", "afd", "launch"]
    node1 = start_node([*launch, "--node-rank", "1", *common])
    node0 = start_node([*launch, "--node-rank", "0", "--port", str(port), *common])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert node0.poll() is None and node1.poll() is None, "".join(
                node0.lines[-10:] + node1.lines[-10:])  # fmt: skip
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("the 2-node cluster did not become healthy in 180 s:\n"
                                 + "".join(node0.lines[-10:] + node1.lines[-10:]))  # fmt: skip
    except BaseException:
        kill_nodes(node0, node1)
        raise
    return node0, node1, base


def start_node(argv: list[str]) -> subprocess.Popen:
    """One node's `afd launch`, in a session of its own, its output lines collected."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    proc.lines = []
    threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True).start()
    return proc


def kill_nodes(*nodes) -> None:
    for proc in nodes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_nodes_on_loopback(tmp_path):
    """Node 1 hosts the expert worker, node 0 the rest and the API; one torch.distributed world.
    Node 1's launcher replaces its expert worker when it is killed, and the cluster re-forms."""
    node0, node1, base = start_two_nodes(tmp_path)
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
        want = LLM("tiny-qwen3-moe", dtype="float32").generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        )
        assert got["choices"][0]["text"] == want[0].outputs[0].text
        os.kill(worker_pid(node0, "expert"), signal.SIGKILL)  # a process of node 1
        again = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == got[
            "choices"][0]["text"]  # fmt: skip
        assert any("recovered in" in line for line in node0.lines), "".join(node0.lines)
        node0.send_signal(signal.SIGINT)
        assert node0.wait(timeout=30) in (0, 130)  # 130: stopped by Ctrl-C
        assert node1.wait(timeout=30) == 0  # node 1 follows node 0 down
    finally:
        kill_nodes(node0, node1)


def test_node_1_exits_when_node_0_is_lost(tmp_path):
    """SIGKILL of all of node 0: node 1's launcher and workers are gone within --node-timeout-s
    (plus the time to stop its workers), not left running."""
    node0, node1, _ = start_two_nodes(tmp_path, "--node-timeout-s", "3")
    try:
        os.killpg(node0.pid, signal.SIGKILL)
        node0.wait()
        lost = time.monotonic()
        assert node1.wait(timeout=3 + 20) == 1, "".join(node1.lines)
        while time.monotonic() - lost < 3 + 25:  # its workers follow their parent
            try:
                os.killpg(node1.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("node 1's workers outlived it")
        assert any("node 0 lost" in line for line in node1.lines), "".join(node1.lines)
    finally:
        kill_nodes(node0, node1)


def test_node_1_lost_during_16_streams_ends_them_with_an_error_then_rejoins(tmp_path, bound):
    """SIGKILL of all of node 1 (the expert worker) during 16 streams: node 0 declares it lost
    after --node-timeout-s, /health turns 503, every stream ends with an error (no hang), and
    node 0 stays up. Node 1 started again (same --node-rank) is taken back: /health 200 and
    the fault-free greedy text."""
    timeout_s = 3.0
    limit = timeout_s + bound(10)
    node0, node1, base = start_two_nodes(tmp_path, "--node-timeout-s", str(timeout_s))
    endings: list[str] = []
    started = threading.Barrier(17)

    def stream(i: int) -> None:
        body = {"prompt": f"stream {i}", "max_tokens": 1900, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                lines = (line for line in r.iter_lines() if line.startswith("data: "))
                assert "error" not in next(lines)
                started.wait(timeout=60)
                endings.append(" ".join(list(lines)[-2:]))
        except httpx.TransportError as e:  # the server went away mid-stream: also an end
            endings.append(f"transport error: {e!r}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=60)
        os.killpg(node1.pid, signal.SIGKILL)
        node1.wait()
        lost = time.monotonic()
        health = None
        while health != 503 and time.monotonic() - lost < limit:
            try:
                health = httpx.get(f"{base}/health", timeout=5).status_code
            except httpx.TransportError:  # node 0 exited before this poll saw the 503
                break
            time.sleep(0.1)
        for t in threads:
            t.join(timeout=max(0.0, lost + limit - time.monotonic()))
        ended = time.monotonic() - lost
        assert health == 503, "".join(node0.lines[-20:])
        assert not any(t.is_alive() for t in threads), f"streams hang {ended:.1f} s after the loss"
        assert len(endings) == 16 and all("error" in e for e in endings), endings
        assert any("node 1 lost" in line for line in node0.lines), "".join(node0.lines[-20:])
        waiting = httpx.get(f"{base}/health", timeout=5)
        assert waiting.status_code == 503 and "waiting for node 1" in waiting.json()["reason"]
        body = {"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 503
        node1 = start_node(node1.args)  # the same command: same rank, secret, address
        assert wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200,
                        bound(120)), "".join(node0.lines[-20:])  # fmt: skip
        got = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        want = LLM("tiny-qwen3-moe", dtype="float32").generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        )
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == want[0].outputs[0].text
        assert any("node 1 rejoined" in line for line in node0.lines), "".join(node0.lines[-20:])
    finally:
        kill_nodes(node0, node1)
        for t in threads:
            t.join(timeout=10)


def test_bench_serve_against_the_cluster(server, tmp_path, capsys):
    from afd.entrypoints.cli import main

    base, _ = server
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", base, "--api-key", "sk-test", "--num-prompts", "8",
                 "--request-rate", "inf", "--random-input-len", "8", "--random-output-len", "6",
                 "--result-file", str(out)])  # fmt: skip
    assert code == 0
    import json

    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["total_output_tokens"] == 48
    assert result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    assert "Time to First Token" in capsys.readouterr().out


def test_aliases_tokenize_and_request_ids_with_the_openai_client(server):
    import openai

    base, _ = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3-moe", "alias"]
    raw = client.completions.with_raw_response.create(
        model="alias", prompt="Hello there", max_tokens=4, temperature=0,
        extra_headers={"X-Request-Id": "trace-7"},
    )  # fmt: skip
    assert raw.headers["x-request-id"] == "trace-7"
    r = raw.parse()
    assert r.model == "tiny-qwen3-moe"
    headers = {"Authorization": "Bearer sk-test"}
    ids = httpx.post(f"{base}/tokenize", json={"prompt": "Hello there"}, headers=headers).json()
    back = httpx.post(f"{base}/detokenize", json={"tokens": ids["tokens"]}, headers=headers)
    assert back.json()["prompt"] == "Hello there" and ids["max_model_len"] == 256
    again = client.completions.create(model="alias", prompt=ids["tokens"], max_tokens=4,
                                      temperature=0)  # fmt: skip
    assert again.choices[0].text == r.choices[0].text
    assert httpx.get(f"{base}/version").json()["version"]


def test_sigterm_with_16_streams_drains_within_the_timeout_and_leaves_nothing(tmp_path, bound):
    """SIGTERM: new requests get 503 at once, the 16 running streams end within
    --shutdown-timeout (with an error event), the launcher exits 0 within the timeout + 5 s,
    and no shm segment or temp folder of AFD's is left."""
    import glob
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    shm_before = set(glob.glob("/dev/shm/*"))
    timeout_s = 3.0
    with launched("--dtype", "float32", "--shutdown-timeout", str(timeout_s), env=env) as (
        base, proc
    ):  # fmt: skip
        endings: list[str] = []
        started = threading.Barrier(17)

        def stream(i: int) -> None:
            body = {"prompt": f"stream {i}", "max_tokens": 1900, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert "error" not in first
                started.wait(timeout=60)
                last = [line for line in lines if line.startswith("data: ")][-2:]
                endings.append(" ".join(last))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert wait_for(lambda: any("shutting down (SIGTERM)" in x for x in proc.lines), 10)
        try:  # refused: the listener is closed, or (if it was not yet) a 503
            late = httpx.post(f"{base}/v1/completions", json={"prompt": "late"}, timeout=5)
            assert late.status_code == 503
        except httpx.TransportError:
            pass
        code = proc.wait(timeout=timeout_s + 30)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(timeout=10)
    assert code == 0, "".join(proc.lines[-20:])
    assert elapsed < timeout_s + bound(5), elapsed
    assert len(endings) == 16
    assert all("service_unavailable" in e and e.endswith("data: [DONE]") for e in endings)
    assert any("shutting down (SIGTERM)" in line for line in proc.lines)
    # torch keeps a compile cache in the temp dir (torchinductor_<user>): not AFD's
    left = [p for p in os.listdir(tmp) if not p.startswith("torchinductor_")]
    assert left == [], left
    assert set(glob.glob("/dev/shm/*")) - shm_before == set()
    assert tempfile.gettempdir() != str(tmp)  # the launcher's TMPDIR was its own

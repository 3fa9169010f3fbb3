"""`afd serve --engine-core-process` end to end: a killed core makes /health 503 and requests
fail (never hang) and the launcher exits 1; SIGTERM drains the streams within the timeout and
leaves no process or socket folder; a killed extra API process leaves the port served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from conftest import free_port, launched

from afd.engine.core import pid_alive

COLOCATED = ("tiny-qwen3-moe", "--num-attention-workers", "0", "--dtype", "float32")


def _children(pid: int) -> dict[int, str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p): Path(f"/proc/{p}/cmdline").read_bytes().decode() for p in out.split()}


def _one(children: dict[int, str], module: str) -> int:
    (pid,) = [p for p, cmd in children.items() if module in cmd]
    return pid


def test_a_killed_core_makes_health_503_and_the_launcher_exit_1():
    with launched(*COLOCATED, "--engine-core-process", serve=True) as (base, proc):
        core = _one(_children(proc.pid), "afd.engine.core")
        got: dict = {}

        def long_request():
            body = {"prompt": "hi", "max_tokens": 1900, "ignore_eos": True}
            got["r"] = httpx.post(f"{base}/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.5)
        os.kill(core, signal.SIGKILL)
        t.join(timeout=15)
        assert not t.is_alive(), "an in-flight request hangs after the core died"
        assert got["r"].status_code >= 500 and got["r"].json()["error"]["message"]
        r = httpx.get(f"{base}/health", timeout=5)
        assert r.status_code == 503 and "core" in r.text
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=15)
        assert r.status_code == 503 and r.json()["error"]["message"]
        assert proc.wait(timeout=30) == 1
    assert _children(proc.pid) == {}


def test_sigterm_drains_streams_and_leaves_nothing(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    timeout_s = 3.0
    args = (*COLOCATED, "--engine-core-process", "--shutdown-timeout", str(timeout_s))
    with launched(*args, serve=True, env=env) as (base, proc):
        children = list(_children(proc.pid))
        endings: list[str] = []
        started = threading.Barrier(5)

        def stream(i: int) -> None:
            body = {"prompt": f"stream {i}", "max_tokens": 1900, "ignore_eos": True,
                    "stream": True}  # fmt: skip
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                started.wait(timeout=60)
                endings.append(" ".join([ln for ln in lines if ln.startswith("data: ")][-2:]))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=timeout_s + 30)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(timeout=10)
    assert code == 0, "".join(proc.lines[-20:])
    assert elapsed < timeout_s + 5, elapsed
    assert len(endings) == 4 and all("service_unavailable" in e for e in endings), endings
    assert not any(pid_alive(p) for p in children)
    left = [p for p in os.listdir(tmp) if not p.startswith("torchinductor_")]
    assert left == [], left


def test_a_killed_api_process_leaves_the_port_and_the_core_serving():
    with launched(*COLOCATED, "--api-server-count", "2", serve=True) as (base, proc):
        children = _children(proc.pid)
        api, core = _one(children, "afd.entrypoints.launch"), _one(children, "afd.engine.core")
        os.kill(api, signal.SIGKILL)
        body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        for _ in range(4):  # every connection now lands on the launcher's API process
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
        assert httpx.get(f"{base}/health", timeout=5).json() == {"status": "ok"}
        assert pid_alive(core)


def test_a_bad_model_is_one_line_and_exit_2_as_in_one_process(tmp_path):
    missing = str(tmp_path / "no-such-model")
    port = str(free_port())
    command = [
        sys.executable,
        "-m",
        "afd",
        "serve",
        missing,
        "--engine-core-process",
        "--port",
        port,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("afd: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "no-such-model" in errors[0], proc.stderr

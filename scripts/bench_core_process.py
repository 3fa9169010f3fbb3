"""Before/after figures of the engine-core process: `afd serve` in one process (before,
--no-engine-core-process) and with the engine-core process (after, the default), alternating
rounds in one run, on colocated and 1P+1A+1F tiny-qwen3-moe: `afd bench serve` metrics,
start-up seconds (spawn to /health 200), RSS per process (API server, engine core, each worker)
and the time to the first token of the first request after start-up. Run under the CPU lock on
a clean tree:

    flock /tmp/afd-cpu.lock timeout 900 python scripts/bench_core_process.py --output FILE

`--build LABEL=PYTHON` (twice or more) compares builds instead of modes: each runs `afd serve`
with its defaults from the interpreter given (e.g. a venv whose editable afd is an older
commit, such as the one before the split); `--no-bench` measures start-up only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from afd.comm.net import free_port

TOPOLOGIES = {
    "colocated": ["--num-attention-workers", "0"],
    "1p1a1f": ["--num-prefill-workers", "1", "--num-attention-workers", "1",
               "--num-expert-workers", "1"],
}  # fmt: skip
MODES = {"one-process": ["--no-engine-core-process"], "core-process": ["--engine-core-process"]}


def _tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(p) for p in out.split()]
    return [pid] + [q for k in kids for q in _tree(k)]


def _rss_mb(pid: int) -> tuple[str, float]:
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    name = " ".join(a.decode() for a in cmd[1:4] if a)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return name, int(line.split()[1]) / 1024
    return name, 0.0


WORKER_READY = re.compile(r"afd: (\w+) worker (\d+) ready \(pid (\d+)")


def _role(pid: int, launcher: int, workers: dict[int, str], name: str) -> str:
    """What a process of the server's tree is: api server, engine core, a worker by its role."""
    if pid == launcher:
        return "api server"
    if "afd.engine.core" in name:
        return "engine core"
    if "resource_tracker" in name:
        return "resource tracker"
    return workers.get(pid, name)


def _first_token_s(base: str) -> float:
    """Seconds to the first streamed token of one request (the first after start-up)."""
    body = {"prompt": "Hello, my name is", "max_tokens": 8, "temperature": 0, "stream": True}
    start = time.monotonic()
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.monotonic() - start
    raise RuntimeError("the first request streamed no token")


def _wait_healthy(proc: subprocess.Popen, base: str, command: list[str]) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)


def _bench(base: str, bench: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "serve.json"
        subprocess.run([sys.executable, "-m", "afd", "bench", "serve", "--base-url", base,
                        "--disable-tqdm", "--result-file", str(result), *bench],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        metrics = json.loads(result.read_text())
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _one_run(model: str, topology: str, mode: str, launch: tuple[str, list[str]],
             bench: list[str] | None) -> dict:  # fmt: skip
    python, flags = launch
    port = free_port()
    command = [python, "-m", "afd", "serve", model, "--port", str(port),
               "--dtype", "float32", *TOPOLOGIES[topology], *flags]  # fmt: skip
    log = tempfile.TemporaryFile("w+")
    start = time.monotonic()
    # cwd away from any checkout: `-m afd` must import the build's own afd
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tempfile.gettempdir())  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, command)
        startup = time.monotonic() - start
        first_token = _first_token_s(base)
        log.seek(0)
        workers = {int(m[3]): f"{m[1]} worker {m[2]}" for m in WORKER_READY.finditer(log.read())}
        rss = [(_role(p, proc.pid, workers, n), mb) for p in _tree(proc.pid)
               for n, mb in [_rss_mb(p)]]  # fmt: skip
        metrics = _bench(base, bench) if bench is not None else {}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    return {
        "topology": topology,
        "mode": mode,
        "startup_s": round(startup, 2),
        "first_token_ms": round(first_token * 1000, 1),
        "rss_mb": [{"process": n, "mb": round(mb, 1)} for n, mb in rss],
        "rss_total_mb": round(sum(mb for _, mb in rss), 1),
        "bench": metrics,
    }


def _code_is_clean() -> bool:
    """No change to tracked files but documentation."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return all(line[3:].endswith(".md") for line in out.splitlines())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _process_means(rs: list[dict]) -> dict[str, float]:
    """Mean RSS per process role over runs (a role missing from a run counts only where seen)."""
    by_role: dict[str, list[float]] = {}
    for r in rs:
        for entry in r["rss_mb"]:
            by_role.setdefault(entry["process"], []).append(entry["mb"])
    return {role: round(_mean(mbs), 1) for role, mbs in by_role.items()}


def summarize(runs: list[dict]) -> list[dict]:
    """Means over the rounds per topology and mode (what the README's table shows): start-up,
    the first request's time to first token, RSS of all processes, of the HTTP (launcher)
    process, of the engine core and per process role; the load's metrics where it ran."""
    out = []
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    for topology in TOPOLOGIES:
        for mode in modes:
            rs = [r for r in runs if r["topology"] == topology and r["mode"] == mode]
            if not rs:
                continue
            row: dict = {"topology": topology, "mode": mode, "rounds": len(rs)}
            for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
                if all(key in r["bench"] for r in rs):
                    row[key] = _mean([r["bench"][key] for r in rs])
            row["startup_s"] = _mean([r["startup_s"] for r in rs])
            # medians too: the first start of a round is often cold (page cache, imports)
            row["startup_s_median"] = statistics.median(r["startup_s"] for r in rs)
            if all("first_token_ms" in r for r in rs):
                row["first_token_ms"] = _mean([r["first_token_ms"] for r in rs])
                row["first_token_ms_median"] = statistics.median(r["first_token_ms"] for r in rs)
            row["rss_total_mb"] = _mean([r["rss_total_mb"] for r in rs])
            row["rss_http_mb"] = _mean([r["rss_mb"][0]["mb"] for r in rs])
            second = [r["rss_mb"][1]["mb"] for r in rs if len(r["rss_mb"]) > 1]
            row["rss_second_mb"] = _mean(second) if second else 0.0
            row["rss_by_process"] = _process_means(rs)
            row["rss_core_mb"] = row["rss_by_process"].get("engine core", 0.0)
            out.append(row)
    return out


def _launches(builds: list[str]) -> dict[str, tuple[str, list[str]]]:
    """label -> (interpreter, flags): the two modes of this build, or the builds given."""
    if not builds:
        return {mode: (sys.executable, flags) for mode, flags in MODES.items()}
    out = {}
    for build in builds:
        label, sep, python = build.partition("=")
        if not sep or not label or not os.access(python, os.X_OK):
            raise SystemExit(f"--build wants LABEL=PYTHON (an interpreter), got {build!r}")
        out[label] = (python, [])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-qwen3-moe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", required=True)
    p.add_argument("--summarize", action="store_true",
                   help="only (re)write the summary of the runs already in --output")  # fmt: skip
    p.add_argument("--bench", default="--num-prompts 48 --max-concurrency 16 "
                   "--random-input-len 64 --random-output-len 32 --request-rate inf")  # fmt: skip
    p.add_argument("--no-bench", action="store_true", help="start-up figures only")
    p.add_argument("--build", action="append", default=[],
                   help="LABEL=PYTHON: compare builds (defaults) instead of modes")  # fmt: skip
    args = p.parse_args()
    if args.summarize:
        data = json.loads(Path(args.output).read_text())
        data["summary"] = summarize(data["runs"])
        Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
        return 0
    launches = _launches(args.build)
    bench = None if args.no_bench else args.bench.split()
    # the code every run imports must be the commit's: checked before the first and after the last
    clean = [_code_is_clean()]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    runs = []
    for r in range(args.rounds):
        order = list(launches) if r % 2 == 0 else list(reversed(launches))  # alternate the first
        for topology in TOPOLOGIES:
            for mode in order:
                run = _one_run(args.model, topology, mode, launches[mode], bench)
                run["round"] = r
                runs.append(run)
                b = run["bench"]
                print(f"round {r} {topology:9s} {mode:12s} start {run['startup_s']:5.1f} s  "
                      f"first token {run['first_token_ms']:7.1f} ms  "
                      f"rss {run['rss_total_mb']:7.1f} MB  "
                      f"out tok/s {b.get('output_throughput', 0):7.1f}  "
                      f"ttft p50 {b.get('median_ttft_ms', 0):7.1f} ms  "
                      f"tpot p50 {b.get('median_tpot_ms', 0):6.1f} ms", flush=True)  # fmt: skip
    clean.append(_code_is_clean())
    out = {"commit": commit.stdout.strip(), "clean_tree": all(clean), "model": args.model,
           "bench_args": None if bench is None else args.bench,
           "builds": {label: python for label, (python, _) in launches.items()},
           "runs": runs, "summary": summarize(runs)}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

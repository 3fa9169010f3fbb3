"""Before/after figures of the engine-core process: `afd serve` in one process (before,
--no-engine-core-process) and with the engine-core process (after, the default), alternating
rounds in one run, on colocated and 1P+1A+1F tiny-qwen3-moe: `afd bench serve` metrics,
start-up seconds (spawn to /health 200) and RSS per process. Run under the CPU lock on a clean tree:

    flock /tmp/afd-cpu.lock timeout 900 python scripts/bench_core_process.py --output FILE
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def _one_run(model: str, topology: str, mode: str, bench: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "afd", "serve", model, "--port", str(port),
               "--dtype", "float32", *TOPOLOGIES[topology], *MODES[mode]]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        startup = time.monotonic() - start
        rss = [_rss_mb(p) for p in _tree(proc.pid)]
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "serve.json"
            subprocess.run([sys.executable, "-m", "afd", "bench", "serve", "--base-url", base,
                            "--disable-tqdm", "--result-file", str(result), *bench],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            metrics = json.loads(result.read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {
        "topology": topology,
        "mode": mode,
        "startup_s": round(startup, 2),
        "rss_mb": [{"process": n, "mb": round(mb, 1)} for n, mb in rss],
        "rss_total_mb": round(sum(mb for _, mb in rss), 1),
        "bench": {k: v for k, v in metrics.items() if isinstance(v, int | float)},
    }


def _code_is_clean() -> bool:
    """No change to tracked files but documentation."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True).stdout  # fmt: skip
    return all(line[3:].endswith(".md") for line in out.splitlines())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(runs: list[dict]) -> list[dict]:
    """Means over the rounds per topology and mode (what the README's table shows); RSS of
    the HTTP (launcher) process and of the second one (the core, or the first worker)."""
    out = []
    for topology in TOPOLOGIES:
        for mode in MODES:
            rs = [r for r in runs if r["topology"] == topology and r["mode"] == mode]
            if not rs:
                continue
            row: dict = {"topology": topology, "mode": mode, "rounds": len(rs)}
            for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms"):
                row[key] = _mean([r["bench"][key] for r in rs])
            row["startup_s"] = _mean([r["startup_s"] for r in rs])
            row["rss_total_mb"] = _mean([r["rss_total_mb"] for r in rs])
            row["rss_http_mb"] = _mean([r["rss_mb"][0]["mb"] for r in rs])
            second = [r["rss_mb"][1]["mb"] for r in rs if len(r["rss_mb"]) > 1]
            row["rss_second_mb"] = _mean(second) if second else 0.0
            out.append(row)
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
    args = p.parse_args()
    if args.summarize:
        data = json.loads(Path(args.output).read_text())
        data["summary"] = summarize(data["runs"])
        Path(args.output).write_text(json.dumps(data, indent=1) + "\n")
        return 0
    # the code every run imports must be the commit's: checked before the first and after the last
    clean = [_code_is_clean()]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    runs = []
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))  # alternate who goes first
        for topology in TOPOLOGIES:
            for mode in order:
                run = _one_run(args.model, topology, mode, args.bench.split())
                run["round"] = r
                runs.append(run)
                b = run["bench"]
                print(f"round {r} {topology:9s} {mode:12s} start {run['startup_s']:5.1f} s  "
                      f"rss {run['rss_total_mb']:7.1f} MB  "
                      f"out tok/s {b.get('output_throughput', 0):7.1f}  "
                      f"ttft p50 {b.get('median_ttft_ms', 0):7.1f} ms  "
                      f"tpot p50 {b.get('median_tpot_ms', 0):6.1f} ms", flush=True)  # fmt: skip
    clean.append(_code_is_clean())
    out = {"commit": commit.stdout.strip(), "clean_tree": all(clean), "model": args.model,
           "bench_args": args.bench, "runs": runs, "summary": summarize(runs)}  # fmt: skip
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

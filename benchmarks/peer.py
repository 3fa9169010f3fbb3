"""`afd bench peer`: AFD against vLLM's CPU build on the same machine, the same checkpoint and the
same client, one server at a time, in alternating rounds (AFD, vLLM, AFD, vLLM, ...).

* serve (default): `afd serve` in each given topology and `vllm serve` from the peer venv, each
  loaded by `vllm bench serve` (or `--client afd`: `afd bench serve`); output tok/s, median TTFT
  and TPOT, goodput and each side's torch threads per round. Against vLLM's server both clients
  run once, to show that `afd bench serve` gives it the figures `vllm bench serve` does.
* offline: `afd.LLM`, `vllm.LLM` and transformers `generate` on the same token-id prompts,
  greedy; tok/s per workload and how many prompts' greedy tokens agree.
* `--profile`: each AFD topology once under py-spy while the load runs; samples folded into
  components (afd.benchmarks.profile_serve).

Every server listens on 127.0.0.1 only and is stopped (its whole process group) before the next
starts; every subprocess runs under a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from afd.comm.net import free_port
from afd.process import raise_interrupt

VENV_ENV = "AFD_PEER_VLLM_VENV"
DEFAULT_VENV = "/work/venvs/vllm-cpu"
# `afd serve` topologies of issue 20's table; LABEL=ARGS, ARGS appended to `afd serve`
DEFAULT_AFD_SIDES = (
    "colocated=--num-attention-workers 0 --num-expert-workers 0 --num-prefill-workers 0",
    "1p1a1f=--num-prefill-workers 1 --num-attention-workers 1 --num-expert-workers 1",
    "1a1f-m2=--num-prefill-workers 0 --num-attention-workers 1 --num-expert-workers 1 "
    "--num-micro-batches 2",
)
# NAME=PROMPTS:MIN-MAX:NEW, prompt lengths drawn uniformly in [MIN, MAX] tokens
DEFAULT_WORKLOADS = ("prefill-heavy=32:16-400:32", "decode-heavy=64:16-48:128")
OFFLINE_ENGINES = ("afd", "vllm", "transformers")
# what one client run reports, under the names `vllm bench serve --save-result` writes
FIGURES = {
    "output_tok_s": "output_throughput",
    "median_ttft_ms": "median_ttft_ms",
    "median_tpot_ms": "median_tpot_ms",
    "goodput_req_s": "request_goodput",
    "request_throughput": "request_throughput",
    "completed": "completed",
    "failed": "failed",
    "duration_s": "duration",
    "total_input_tokens": "total_input_tokens",
    "total_output_tokens": "total_output_tokens",
}
SUMMARY_FIGURES = ("output_tok_s", "median_ttft_ms", "median_tpot_ms", "goodput_req_s")


@dataclass
class Load:
    """The client's workload: random prompts of `input_len` tokens, `output_len` out each."""

    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    concurrency: int = 16
    seed: int = 0
    goodput_ttft_ms: float = 1000.0
    goodput_tpot_ms: float = 100.0
    warmup_prompts: int = 16


@dataclass
class Side:
    """One server to measure: `engine` afd or vllm, its extra arguments."""

    label: str
    engine: str
    args: list[str] = field(default_factory=list)
    python: str | None = None  # the interpreter of `-m afd serve` (None: this one)


# ---- arguments ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `afd bench peer`."""
    p.add_argument("--mode", default="serve", choices=["serve", "offline", "both"], help="what")
    p.add_argument(
        "--model",
        default="peer-qwen3-moe",
        help="peer-qwen3-moe, peer-attention-heavy, peer-expert-heavy, or a model dir",
    )
    p.add_argument(
        "--vllm-venv",
        default=os.environ.get(VENV_ENV, DEFAULT_VENV),
        help=f"venv of vLLM's CPU build (default ${VENV_ENV}, else {DEFAULT_VENV})",
    )
    p.add_argument("--no-vllm", action="store_true", help="AFD (and transformers) only")
    p.add_argument(
        "--afd",
        action="append",
        default=None,
        metavar="LABEL=ARGS",
        help="an `afd serve` side: LABEL=its topology flags (repeat; default: colocated, "
        "1p1a1f, 1a1f-m2)",
    )
    p.add_argument(
        "--afd-python",
        action="append",
        default=[],
        help="LABEL=PYTHON: run that --afd side's `-m afd serve` with another interpreter (e.g. "
        "one importing another checkout, for before/after in the same run)",
    )
    p.add_argument("--vllm-arg", action="append", default=[], help="extra `vllm serve` argument")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every side")
    p.add_argument("--client", default="vllm", choices=["vllm", "afd"], help="load generator")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per timed run")
    p.add_argument("--random-input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--random-output-len", type=int, default=64, help="output tokens (EOS ignored)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--warmup-prompts", type=int, default=16, help="untimed requests per start")
    p.add_argument("--seed", type=int, default=0, help="of the prompts")
    p.add_argument("--max-model-len", type=int, default=1024, help="both servers'")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--no-parity", action="store_true", help="skip `afd bench serve` vs vLLM's")
    p.add_argument("--parity-tolerance", type=float, default=0.1, help="relative, per figure")
    p.add_argument("--no-compile-warmup", action="store_true", help="no untimed vLLM start first")
    p.add_argument(
        "--offline-workload",
        action="append",
        default=None,
        metavar="NAME=N:MIN-MAX:NEW",
        help="offline prompts (default: prefill-heavy=32:16-400:32, decode-heavy=64:16-48:128)",
    )
    p.add_argument(
        "--offline-engines",
        default=",".join(OFFLINE_ENGINES),
        help="comma-separated, in round order",
    )
    p.add_argument("--profile", action="store_true", help="py-spy each AFD side under the load")
    p.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--profile-idle", action="store_true", help="also sample sleeping threads")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds per server start")
    p.add_argument(
        "--run-timeout", type=float, default=900.0, help="seconds per client/offline run"
    )
    p.add_argument("--name", default=None, help="result name (default peer-MODE-MODEL)")
    p.add_argument("--output", default=None, help="result JSON path (default: benchmarks/results)")
    p.add_argument("--log-dir", default=None, help="keep server and client logs here")


def parse_side(text: str) -> Side:
    """'LABEL=--flag v ...' -> an afd Side; ValueError for an empty or odd label."""
    label, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", label):
        raise ValueError(f"--afd expects LABEL=ARGS with a short label, got {text!r}")
    if label == "vllm":
        raise ValueError("--afd label 'vllm' names the peer; choose another")
    return Side(label, "afd", shlex.split(rest))


def parse_workload(text: str) -> tuple[str, dict[str, int]]:
    """'decode-heavy=64:16-48:128' -> ('decode-heavy', {num, min_len, max_len, max_tokens})."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(\d+):(\d+)-(\d+):(\d+)", text.strip())
    if not m:
        raise ValueError(f"--offline-workload expects NAME=N:MIN-MAX:NEW, got {text!r}")
    n, lo, hi, new = (int(g) for g in m.groups()[1:])
    if not (1 <= n <= 100_000 and 1 <= lo <= hi <= 1_000_000 and 1 <= new <= 1_000_000):
        raise ValueError(f"--offline-workload {text!r}: need N >= 1, 1 <= MIN <= MAX, NEW >= 1")
    return m.group(1), {"num": n, "min_len": lo, "max_len": hi, "max_tokens": new}


def _validate(args: argparse.Namespace) -> None:
    checks = [
        (1 <= args.rounds <= 100, "--rounds must be in 1..100"),
        (args.num_prompts >= 1, "--num-prompts must be at least 1"),
        (args.random_input_len >= 1, "--random-input-len must be at least 1"),
        (args.random_output_len >= 2, "--random-output-len must be at least 2 (for TPOT)"),
        (args.max_concurrency >= 1, "--max-concurrency must be at least 1"),
        (args.warmup_prompts >= 0, "--warmup-prompts must not be negative"),
        (args.max_model_len >= 2, "--max-model-len must be at least 2"),
        (0 < args.kv_cache_gib < 1 << 20, "--kv-cache-gib must be positive"),
        (0 <= args.parity_tolerance < 10, "--parity-tolerance must be in [0, 10)"),
        (1 <= args.profile_rate <= 1000, "--profile-rate must be in 1..1000"),
        (0 < args.startup_timeout <= 86400, "--startup-timeout must be in (0, 86400]"),
        (0 < args.run_timeout <= 86400, "--run-timeout must be in (0, 86400]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.random_input_len + args.random_output_len > args.max_model_len:
        raise ValueError("--random-input-len + --random-output-len exceed --max-model-len")


# ---- bookkeeping (pure) ------------------------------------------------------------------------


def schedule(labels: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, side) in run order: every side once per round, in the order given."""
    return [(r, label) for r in range(rounds) for label in labels]


def client_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of one client run from its result JSON (`vllm bench serve --save-result` or
    `afd bench serve`, which share the names); ValueError naming a missing one."""
    missing = [key for key in FIGURES.values() if key not in result]
    if missing:
        raise ValueError(f"client result lacks {', '.join(missing)}")
    return {name: result[key] for name, key in FIGURES.items()}


def summarise(rounds: list[dict], labels: list[str]) -> dict[str, Any]:
    """Per side: each figure per round and its median; per AFD side and round, its ratio to
    vLLM's figure of the same round (output tok/s and median TPOT)."""
    sides: dict[str, Any] = {}
    for label in labels:
        runs = [r for r in rounds if r["side"] == label and r.get("figures")]
        entry: dict[str, Any] = {"rounds": len(runs)}
        for fig in SUMMARY_FIGURES:
            values = [r["figures"][fig] for r in runs if r["figures"][fig] is not None]
            entry[fig] = statistics.median(values) if values else None
            entry[f"{fig}_per_round"] = values
        sides[label] = entry
    ratios: dict[str, Any] = {}
    vllm = {r["round"]: r["figures"] for r in rounds if r["side"] == "vllm" and r.get("figures")}
    for label in labels:
        if label == "vllm" or not vllm:
            continue
        out, tpot = [], []
        for r in rounds:
            if r["side"] == label and r.get("figures") and r["round"] in vllm:
                peer = vllm[r["round"]]
                out.append(r["figures"]["output_tok_s"] / peer["output_tok_s"])
                tpot.append(r["figures"]["median_tpot_ms"] / peer["median_tpot_ms"])
        ratios[label] = {
            "output_tok_s_ratio_per_round": out,
            "median_tpot_ratio_per_round": tpot,
            "output_tok_s_ratio": statistics.median(out) if out else None,
            "median_tpot_ratio": statistics.median(tpot) if tpot else None,
        }
    return {"sides": sides, "vs_vllm": ratios}


def parity(vllm_client: dict, afd_client: dict, tolerance: float) -> dict[str, Any]:
    """Both clients' figures against one server, their ratios and whether each is within
    `tolerance` (relative)."""
    ratios = {}
    for fig in ("output_tok_s", "median_ttft_ms", "median_tpot_ms"):
        a, b = afd_client[fig], vllm_client[fig]
        ratios[fig] = a / b if b else None
    same = all(r is not None and abs(r - 1) <= tolerance for r in ratios.values())
    return {
        "vllm_bench_serve": vllm_client,
        "afd_bench_serve": afd_client,
        "afd_over_vllm": ratios,
        "tolerance": tolerance,
        "same_figures": same,
    }


def vllm_threads(log: str) -> int | None:
    """The torch threads vLLM's engine runs its model with, from its log."""
    m = re.search(r"Reducing Torch threads from \d+ to (\d+)", log)
    if m:
        return int(m.group(1))
    m = re.search(r"core ids=\[([\d, ]+)\]", log)
    return len([c for c in m.group(1).split(",") if c.strip()]) if m else None


def afd_threads(log: str, default: int) -> dict[str, Any]:
    """What AFD's start-up log says about threads, and torch's default in this environment
    (what a process that sets none runs with)."""
    lines = [ln.strip() for ln in log.splitlines() if re.search(r"(?i)\bthreads?\b", ln)]
    reported = None
    for ln in lines:
        m = re.search(r"(?i)threads?\s*[=:]\s*(\d+)|(\d+)\s+(?:torch |intra-op )?threads?", ln)
        if m:
            reported = int(m.group(1) or m.group(2))
            break
    return {"reported": reported, "log_lines": lines[:8], "torch_default": default}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How many prompts' token lists are equal, and where the others first differ."""
    diverge = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            at = next(
                (j for j, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                min(len(x), len(y)),
            )
            diverge.append({"prompt": i, "first_difference_at": at})
    return {"prompts": len(a), "agree": len(a) - len(diverge), "differ": diverge[:20]}


def random_prompts(allowed: list[int], spec: dict[str, int], seed: int) -> list[list[int]]:
    """`spec['num']` prompts of token ids drawn from `allowed`, lengths in [min_len, max_len]."""
    import random

    rng = random.Random(seed)
    return [
        [rng.choice(allowed) for _ in range(rng.randint(spec["min_len"], spec["max_len"]))]
        for _ in range(spec["num"])
    ]


# ---- processes ---------------------------------------------------------------------------------


class Server:
    """A server subprocess in its own process group: started, waited for (`/v1/models`), and
    always stopped with its whole group (SIGINT, then SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: list[str], env: dict[str, str], port: int, log: Path):
        self.cmd, self.env, self.port, self.log = cmd, env, port, log
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0

    @property
    def base_url(self) -> str:
        """Where the server answers."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float) -> float:
        """Start and wait until it lists its models; RuntimeError with the log's tail if it
        exits or does not get ready in `timeout_s`. Returns the seconds it took."""
        import httpx

        t0 = time.monotonic()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(
                self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"server not ready in {timeout_s:g} s:\n{self.tail()}")
            try:
                r = httpx.get(f"{self.base_url}/v1/models", timeout=2, trust_env=False)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        return self.startup_s

    def tail(self, n: int = 15) -> str:
        """The last lines of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and every process of its group; returns when none is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is None or _group_alive(pgid):
                _killpg(pgid, sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
            if _wait_group(pgid, wait_s):
                break
        self.proc = None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_group(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def group_cpu_s(pgid: int) -> dict[int, tuple[str, float]]:
    """pid -> (its command line, CPU seconds so far: user + system) of every live process of
    process group `pgid` (Linux /proc; empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # fields: state ppid pgrp ... utime(11) stime(12)
            found[int(entry.name)] = (cmdline.strip(), (int(fields[11]) + int(fields[12])) / tick)
    return found


def cpu_use(before: dict, after: dict, figures: dict, leader: int) -> dict[str, Any]:
    """The CPU seconds each server process spent during the timed run and per 1000 output
    tokens; the group leader (the API process of `afd serve`) first."""
    tokens = figures.get("total_output_tokens") or 0
    procs = []
    for pid, (cmd, cpu) in sorted(after.items(), key=lambda item: (item[0] != leader, item[0])):
        spent = cpu - before.get(pid, (cmd, 0.0))[1]
        per_k = spent / tokens * 1000 if tokens else None
        procs.append({"pid": pid, "leader": pid == leader, "command": cmd[:200],
                      "cpu_s": spent, "cpu_s_per_1k_tokens": per_k})  # fmt: skip
    total = sum(p["cpu_s"] for p in procs)
    return {
        "processes": procs,
        "total_cpu_s": total,
        "total_cpu_s_per_1k_tokens": total / tokens * 1000 if tokens else None,
    }


def run_bounded(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Run `cmd` to completion (output to `log`), in its own group, killed with it at
    `timeout_s`; RuntimeError with the log's tail if it fails."""
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if code != 0:
        lines = log.read_text(errors="replace").splitlines()[-15:]
        why = f"timed out after {timeout_s:g} s" if code is None else f"exit {code}"
        raise RuntimeError(f"{shlex.join(cmd[:3])} ...: {why}:\n" + "\n".join(lines))


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Peer:
    """Everything a run needs: the model, the sides, the load, the venv, where logs go."""

    model_name: str
    model_dir: Path
    sides: list[Side]
    load: Load
    venv: Path
    max_model_len: int
    kv_cache_gib: float
    client: str
    logs: Path
    startup_timeout: float
    run_timeout: float
    torch_default_threads: int

    def vllm_bin(self, name: str) -> str:
        """A program of the peer venv."""
        return str(self.venv / "bin" / name)

    def env(self, engine: str) -> dict[str, str]:
        """The environment of a server or run of `engine` (vLLM's KV cache size; no proxies)."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        if engine == "vllm":
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
        return env

    def server_cmd(self, side: Side, port: int) -> list[str]:
        """`afd serve ...` or `vllm serve ...` for `side` on `port` (loopback)."""
        common = ["--host", "127.0.0.1", "--port", str(port)]
        common += ["--served-model-name", self.model_name, "--dtype", "float32"]
        common += ["--max-model-len", str(self.max_model_len)]
        if side.engine == "vllm":
            return [self.vllm_bin("vllm"), "serve", str(self.model_dir), *common, *side.args]
        afd = [side.python or sys.executable, "-m", "afd", "serve", str(self.model_dir), *common]
        return afd + ["--disable-log-requests", *side.args]

    def shown(self, cmd: list[str], engine: str) -> str:
        """A command line as recorded: with the environment variables it ran with."""
        prefix = f"VLLM_CPU_KVCACHE_SPACE={self.kv_cache_gib:g} " if engine == "vllm" else ""
        return prefix + shlex.join(cmd)


def vllm_client_cmd(peer: Peer, base_url: str, load: Load, out: Path) -> list[str]:
    """`vllm bench serve` from the peer venv with `load`, saving its result to `out`."""
    return [
        peer.vllm_bin("vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--model",
        peer.model_name,
        "--tokenizer",
        str(peer.model_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(load.input_len),
        "--random-output-len",
        str(load.output_len),
        "--num-prompts",
        str(load.num_prompts),
        "--max-concurrency",
        str(load.concurrency),
        "--ignore-eos",
        "--seed",
        str(load.seed),
        "--goodput",
        f"ttft:{load.goodput_ttft_ms:g}",
        f"tpot:{load.goodput_tpot_ms:g}",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
        "--disable-tqdm",
    ]


def words_for_tokens(model_dir: Path, tokens: int, seed: int) -> int:
    """`afd bench serve` prompts are words: how many words make `tokens` tokens on average with
    this model's tokenizer (so both clients send prompts of the same length)."""
    from afd.benchmarks.serve import random_requests
    from afd.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    specs = random_requests(32, tokens, 1, 0.0, seed)
    per_word = sum(len(tok.encode(s.prompt)) for s in specs) / sum(s.prompt_words for s in specs)
    return max(1, round(tokens / per_word))


def afd_client(peer: Peer, base_url: str, load: Load) -> tuple[dict, str]:
    """Run `afd bench serve`'s load in this process; (its metrics, its command line)."""
    from afd.benchmarks import serve

    words = words_for_tokens(peer.model_dir, load.input_len, load.seed)
    ns = argparse.Namespace(
        base_url=base_url,
        endpoint="/v1/completions",
        model=peer.model_name,
        api_key=None,
        num_prompts=load.num_prompts,
        random_input_len=words,
        random_output_len=load.output_len,
        random_range_ratio=0.0,
        request_rate=float("inf"),
        burstiness=1.0,
        max_concurrency=load.concurrency,
        metric_percentiles="50,99",
        temperature=0.0,
        goodput=[f"ttft:{load.goodput_ttft_ms:g}", f"tpot:{load.goodput_tpot_ms:g}"],
        request_timeout=peer.run_timeout,
        seed=load.seed,
        disable_tqdm=True,
    )
    cmd = ["afd", "bench", "serve", "--base-url", base_url, "--model", peer.model_name]
    cmd += ["--num-prompts", str(load.num_prompts), "--random-input-len", str(words)]
    cmd += ["--random-output-len", str(load.output_len), "--max-concurrency"]
    cmd += [str(load.concurrency), "--goodput", *ns.goodput, "--seed", str(load.seed)]
    return asyncio.run(serve.benchmark(ns)), shlex.join(cmd)


def run_client(peer: Peer, client: str, base_url: str, load: Load, tag: str) -> tuple[dict, str]:
    """One load run by `client` (vllm or afd); (its figures, its command line)."""
    if client == "afd":
        metrics, shown = afd_client(peer, base_url, load)
        return client_figures(metrics), shown
    out = peer.logs / f"{tag}.json"
    cmd = vllm_client_cmd(peer, base_url, load, out)
    run_bounded(cmd, peer.env("vllm"), peer.logs / f"{tag}.log", peer.run_timeout)
    return client_figures(json.loads(out.read_text())), shlex.join(cmd)


def _warm(peer: Peer, base_url: str, tag: str) -> None:
    w = peer.load.warmup_prompts
    if w:
        load = Load(w, peer.load.input_len, 8, min(w, peer.load.concurrency), peer.load.seed + 1)
        run_client(peer, peer.client, base_url, load, f"{tag}-warmup")


def serve_round(peer: Peer, side: Side, r: int, with_parity: float | None) -> dict[str, Any]:
    """Start `side`, warm it, run the timed load (and on vLLM, if asked, both clients), stop."""
    port = free_port()
    tag = f"r{r}-{side.label}"
    server = Server(
        peer.server_cmd(side, port), peer.env(side.engine), port, peer.logs / f"{tag}.server.log"
    )
    row: dict[str, Any] = {"round": r, "side": side.label, "engine": side.engine}
    try:
        row["startup_s"] = server.start(peer.startup_timeout)
        _warm(peer, server.base_url, tag)
        before = group_cpu_s(server.proc.pid)
        row["figures"], row["client_command"] = run_client(
            peer, peer.client, server.base_url, peer.load, tag
        )
        after = group_cpu_s(server.proc.pid)
        row["server_cpu"] = cpu_use(before, after, row["figures"], server.proc.pid)
        if with_parity is not None:
            other = "afd" if peer.client == "vllm" else "vllm"
            figs, shown = run_client(peer, other, server.base_url, peer.load, f"{tag}-parity")
            by = {peer.client: row["figures"], other: figs}
            row["parity"] = parity(by["vllm"], by["afd"], with_parity)
            row["parity"]["commands"] = {peer.client: row["client_command"], other: shown}
    finally:
        server.stop()
    log = server.log.read_text(errors="replace")
    if side.engine == "vllm":
        row["torch_threads"] = {"reported": vllm_threads(log)}
    else:
        row["torch_threads"] = afd_threads(log, peer.torch_default_threads)
    f = row["figures"]
    print(
        f"peer: round {r} {side.label:<12} {f['output_tok_s']:8.1f} tok/s  TTFT "
        f"{f['median_ttft_ms']:7.1f} ms  TPOT {f['median_tpot_ms']:6.2f} ms  goodput "
        f"{f['goodput_req_s'] or 0:5.2f} req/s  (start {row['startup_s']:.0f} s)",
        flush=True,
    )
    return row


def compile_warmup(peer: Peer) -> float:
    """Start vLLM once, untimed, so its compile cache is warm as on a user's second start."""
    port = free_port()
    vllm = Side("vllm", "vllm", [])
    server = Server(
        peer.server_cmd(vllm, port),
        peer.env("vllm"),
        port,
        peer.logs / "vllm-compile-warmup.server.log",
    )
    try:
        return server.start(peer.startup_timeout)
    finally:
        server.stop()


def run_serve(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """The serving comparison: alternating rounds of every side; the payload of its result."""
    by_label = {s.label: s for s in peer.sides}
    payload: dict[str, Any] = {}
    has_vllm = "vllm" in by_label
    if has_vllm and not args.no_compile_warmup:
        payload["vllm_compile_warmup_startup_s"] = compile_warmup(peer)
    rounds = []
    for r, label in schedule(list(by_label), args.rounds):
        check = None if args.no_parity or label != "vllm" or r else args.parity_tolerance
        rounds.append(serve_round(peer, by_label[label], r, check))
    payload["rounds"] = rounds
    payload.update(summarise(rounds, list(by_label)))
    payload["table"] = _table(peer, payload["sides"], rounds)
    payload["client_parity"] = next((r["parity"] for r in rounds if "parity" in r), None)
    return payload


def _table(peer: Peer, sides: dict[str, Any], rounds: list[dict]) -> list[dict]:
    """One row per side (medians over rounds), for the docs' `each` templates."""
    rows = []
    for side in peer.sides:
        s = sides[side.label]
        threads = [r["torch_threads"].get("reported") for r in rounds if r["side"] == side.label]
        rows.append(
            {
                "side": side.label,
                "engine": side.engine,
                "command": peer.shown(peer.server_cmd(side, 8000), side.engine),
                "torch_threads": threads[0] if threads else None,
                **{k: s[k] for k in ("rounds", *SUMMARY_FIGURES)},
            }
        )
    return rows


def _vocab_ids(model_dir: Path) -> list[int]:
    """Token ids a prompt may hold: the vocabulary less special and added tokens."""
    from tokenizers import Tokenizer as HFTokenizer

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    added = set(tok.get_added_tokens_decoder())
    return [i for i in range(min(vocab, tok.get_vocab_size())) if i not in added]


def offline_round(peer: Peer, engine: str, job_path: Path, r: int) -> dict[str, Any]:
    """One fresh process of `engine` on the job's workloads."""
    script = Path(__file__).with_name("peer_offline.py")
    python = peer.vllm_bin("python") if engine == "vllm" else sys.executable
    out = peer.logs / f"offline-r{r}-{engine}.json"
    # -P: the script's folder holds kernels.py, which would hide the package transformers imports
    cmd = [python, "-P", str(script), engine, str(job_path), str(out)]
    cmd += ["--reference"] if engine == "transformers" and r == 0 else []
    log = peer.logs / f"offline-r{r}-{engine}.log"
    t0 = time.monotonic()
    run_bounded(cmd, peer.env(engine), log, peer.run_timeout)
    result = json.loads(out.read_text())
    result["process_s"] = time.monotonic() - t0
    result["command"] = peer.shown(cmd, engine)
    if engine == "vllm":  # its model runs in the engine core process, which logs its threads
        result["torch_threads"] = vllm_threads(log.read_text(errors="replace"))
    for name, w in result["workloads"].items():
        print(
            f"peer: offline round {r} {engine:<12} {name:<14} {w['output_tok_s']:8.1f} tok/s"
            f" ({w['generate_s']:.1f} s)",
            flush=True,
        )
    return result


def run_offline(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """Offline generate: alternating rounds of each engine on the same prompts; tok/s, ratios,
    and greedy agreement (counted on round 0)."""
    specs = dict(parse_workload(w) for w in (args.offline_workload or DEFAULT_WORKLOADS))
    engines = [e.strip() for e in args.offline_engines.split(",") if e.strip()]
    if args.no_vllm:
        engines = [e for e in engines if e != "vllm"]
    unknown = set(engines) - set(OFFLINE_ENGINES)
    if unknown or not engines:
        raise ValueError(f"--offline-engines: choose from {', '.join(OFFLINE_ENGINES)}")
    allowed = _vocab_ids(peer.model_dir)
    workloads = {
        name: {"prompts": random_prompts(allowed, s, args.seed + i), "max_tokens": s["max_tokens"]}
        for i, (name, s) in enumerate(specs.items())
    }
    longest = max(s["max_len"] + s["max_tokens"] for s in specs.values())
    if longest > args.max_model_len:
        raise ValueError(f"an offline prompt and its tokens need {longest} > --max-model-len")
    job = {
        "model": str(peer.model_dir),
        "dtype": "float32",
        "max_model_len": args.max_model_len,
        "seed": args.seed,
        "workloads": workloads,
    }
    job_path = peer.logs / "offline-job.json"
    job_path.write_text(json.dumps(job))
    runs = {e: [] for e in engines}
    for r, engine in schedule(engines, args.rounds):
        runs[engine].append(offline_round(peer, engine, job_path, r))
    return {
        "workloads": {n: dict(s) for n, s in specs.items()},
        "engines": engines,
        **offline_summary(runs, list(specs)),
    }


def offline_summary(runs: dict[str, list[dict]], names: list[str]) -> dict[str, Any]:
    """tok/s per engine, workload and round; AFD's ratio to the others per round; agreement of
    the greedy tokens between engines (round 0) and across rounds of one engine."""
    table = []
    for name in names:
        row: dict[str, Any] = {"workload": name}
        for engine, rs in runs.items():
            row[f"{engine}_tok_s_per_round"] = [x["workloads"][name]["output_tok_s"] for x in rs]
            row[f"{engine}_tok_s"] = statistics.median(row[f"{engine}_tok_s_per_round"])
        for other in ("vllm", "transformers"):
            if "afd" in runs and other in runs:
                per = [
                    a / b
                    for a, b in zip(
                        row["afd_tok_s_per_round"], row[f"{other}_tok_s_per_round"], strict=False
                    )
                ]
                row[f"afd_over_{other}_per_round"] = per
                row[f"afd_over_{other}"] = statistics.median(per)
        engines = list(runs)
        row["agreement"] = {
            f"{a}_vs_{b}": agreement(
                runs[a][0]["workloads"][name]["tokens"], runs[b][0]["workloads"][name]["tokens"]
            )
            for i, a in enumerate(engines)
            for b in engines[i + 1 :]
        }
        ref = runs.get("transformers", [{}])[0].get("workloads", {}).get(name, {})
        if "reference_tokens" in ref:  # each prompt alone: no padding in the way
            for e in engines:
                row["agreement"][f"{e}_vs_transformers_unpadded"] = agreement(
                    runs[e][0]["workloads"][name]["tokens"], ref["reference_tokens"]
                )
        row["deterministic"] = {
            e: all(x["workloads"][name]["tokens"] == rs[0]["workloads"][name]["tokens"] for x in rs)
            for e, rs in runs.items()
        }
        table.append(row)
    engines_info = {
        e: {
            "command": rs[0]["command"],
            "version": rs[0]["version"],
            "torch_threads": rs[0]["torch_threads"],
            "load_s": [x["load_s"] for x in rs],
        }
        for e, rs in runs.items()
    }
    return {"table": table, "engine_runs": engines_info}


def run_profile(peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    """Each AFD side once under py-spy while the timed load runs; samples folded."""
    from afd.benchmarks.profile_serve import Recorder, fold, format_profile, parse_raw

    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        raise ValueError("--profile needs py-spy: pip install 'afd[bench]'")
    profiles = []
    for side in peer.sides:
        if side.engine != "afd":
            continue
        port = free_port()
        tag = f"profile-{side.label}"
        server = Server(
            peer.server_cmd(side, port), peer.env("afd"), port, peer.logs / f"{tag}.server.log"
        )
        raw = peer.logs / f"{tag}.raw.txt"
        try:
            startup = server.start(peer.startup_timeout)
            _warm(peer, server.base_url, tag)
            rec = Recorder(
                str(py_spy),
                server.proc.pid,
                raw,
                args.profile_rate,
                args.profile_idle,
                peer.logs / f"{tag}.py-spy.log",
            )
            rec.start()
            try:
                figures, shown = run_client(peer, peer.client, server.base_url, peer.load, tag)
            finally:
                seconds = rec.stop()
        finally:
            server.stop()
        if not raw.is_file():
            raise RuntimeError(f"py-spy wrote no samples; its log: {rec.log}")
        folded = fold(parse_raw(raw.read_text(errors="replace")))
        print(f"peer: profile of {side.label} ({seconds:.0f} s at {args.profile_rate} Hz)")
        print(format_profile(folded))
        profiles.append(
            {
                "side": side.label,
                "command": peer.shown(peer.server_cmd(side, port), "afd"),
                "client_command": shown,
                "py_spy_command": shlex.join(rec.command()),
                "startup_s": startup,
                "seconds": seconds,
                "rate_hz": args.profile_rate,
                "idle": args.profile_idle,
                "figures_under_profiling": figures,
                **folded,
            }
        )
    return {"profiles": profiles}


def build_peer(args: argparse.Namespace, logs: Path) -> Peer:
    """The run's model, sides and load from the arguments (the checkpoint built if needed)."""
    import torch

    from afd.benchmarks.peer_models import peer_model_path

    sides = [parse_side(s) for s in (args.afd or DEFAULT_AFD_SIDES)]
    if len({s.label for s in sides}) != len(sides):
        raise ValueError("--afd labels must differ")
    for text in args.afd_python:
        label, sep, python = text.partition("=")
        side = next((s for s in sides if s.label == label), None)
        if not sep or side is None or not Path(python).is_file():
            raise ValueError(f"--afd-python expects LABEL=PYTHON of an --afd side, got {text!r}")
        side.python = python
    venv = Path(args.vllm_venv).expanduser()
    needs_vllm = not args.no_vllm and not args.profile
    needs_vllm = needs_vllm or (args.client == "vllm" and args.mode != "offline")
    if needs_vllm and not (venv / "bin" / "vllm").is_file():
        raise ValueError(
            f"no vLLM at {venv}/bin/vllm: build it with shared/peers/"
            "vllm-cpu-venv.sh, pass --vllm-venv, or --no-vllm --client afd"
        )
    model_dir = peer_model_path(args.model)
    name = args.model if not Path(args.model).expanduser().is_dir() else model_dir.name
    if not args.no_vllm and not args.profile:
        sides.append(Side("vllm", "vllm", list(args.vllm_arg)))
    load = Load(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.max_concurrency,
        args.seed,
        warmup_prompts=args.warmup_prompts,
    )
    return Peer(
        name,
        model_dir,
        sides,
        load,
        venv,
        args.max_model_len,
        args.kv_cache_gib,
        args.client,
        logs,
        args.startup_timeout,
        args.run_timeout,
        torch.get_num_threads(),
    )


def _model_info(model_dir: Path) -> dict[str, Any]:
    cfg = json.loads((model_dir / "config.json").read_text())
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "intermediate_size",
        "vocab_size",
        "dtype",
    )
    return {k: cfg.get(k) for k in keys}


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench peer`."""
    from afd.results import write_result

    _validate(args)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # servers stop on SIGTERM too
    try:
        with tempfile.TemporaryDirectory(prefix="afd-peer-") as tmp:
            logs = Path(args.log_dir) if args.log_dir else Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            peer = build_peer(args, logs)
            payload: dict[str, Any] = {
                "model": {
                    "name": peer.model_name,
                    "path": str(peer.model_dir),
                    **_model_info(peer.model_dir),
                },
                "load": asdict(peer.load),
                "client": peer.client,
                "sides": {
                    s.label: {
                        "engine": s.engine,
                        "command": peer.shown(peer.server_cmd(s, 8000), s.engine),
                    }
                    for s in peer.sides
                },
            }
            mode = "profile" if args.profile else args.mode
            if args.profile:
                payload |= run_profile(peer, args)
            else:
                if args.mode in ("serve", "both"):
                    payload["serve"] = run_serve(peer, args)
                if args.mode in ("offline", "both"):
                    payload["offline"] = run_offline(peer, args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    name = args.name or f"peer-{mode}-{peer.model_name}"
    out = write_result(name, payload, path=args.output, argv=getattr(args, "command_argv", None))
    print(format_summary(payload))
    print(f"results written to {out}")
    return 0


def format_summary(payload: dict[str, Any]) -> str:
    """The tables printed at the end: serving per side, offline per workload."""
    lines = []
    if "serve" in payload:
        lines.append(
            f"{'side':<14}{'tok/s':>9}{'TTFT ms':>10}{'TPOT ms':>10}{'goodput':>9}{'threads':>9}"
        )
        for row in payload["serve"]["table"]:
            lines.append(
                f"{row['side']:<14}{row['output_tok_s']:>9.1f}"
                f"{row['median_ttft_ms']:>10.1f}{row['median_tpot_ms']:>10.2f}"
                f"{row['goodput_req_s'] or 0:>9.2f}{row['torch_threads']!s:>9}"
            )
        p = payload["serve"].get("client_parity")
        if p:
            ratios = ", ".join(f"{k} {v:.2f}" for k, v in p["afd_over_vllm"].items())
            lines.append(
                f"afd bench serve / vllm bench serve on vLLM: {ratios} "
                f"(same within {p['tolerance']:.0%}: {p['same_figures']})"
            )
    for row in payload.get("offline", {}).get("table", []):
        tps = "  ".join(f"{k[:-6]} {v:.0f}" for k, v in row.items() if k.endswith("_tok_s"))
        agree = ", ".join(f"{k} {v['agree']}/{v['prompts']}" for k, v in row["agreement"].items())
        lines.append(f"offline {row['workload']}: {tps} tok/s; agree: {agree}")
    return "\n".join(lines)

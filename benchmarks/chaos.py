"""`afd bench chaos`: kill workers of a local cluster at intervals during a load run, or a
whole node of a 2-node loopback cluster during streams.

Workers: starts `afd launch` with the given topology, runs the `afd bench serve` load against
it, and every `--kill-every` seconds sends `--kill-signal` to the current worker of
`--kill-worker` (`any` takes expert, attention and prefill in turn). Reports, next to the
serving table: kills, recoveries, recovery time p50/max (from the launcher's "recovered in"
lines), requests failed (the target is 0) and requests recomputed
(`afd:requests_recomputed_total` on the server's /metrics; missing is an error).

A node (`--kill-node 1`): starts node 1 and node 0 (`--nnodes 2` on 127.0.0.1, a fresh secret),
opens `--streams` streams, SIGKILLs node 1's process group once every stream has its first
token, and reports the seconds until /health is 503 and until every stream ended, the requests
failed and recomputed; with `--restart` it starts node 1 again (the same command) and reports
the seconds until node 0 serves again and whether a greedy request gives the text it gave
before the loss. Writes the result with `afd.results.write_result` (command, commit, machine,
date inside).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from afd.benchmarks.server import Launched, launch_argv, start_server
from afd.comm.net import free_port

ROLES = ("expert", "attention", "prefill")
SIGNALS = {"KILL": signal.SIGKILL, "STOP": signal.SIGSTOP}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from afd.entrypoints.flags import add_engine_args

    add_engine_args(p, workers=1)
    p.add_argument(
        "--kill-worker", default="any", choices=[*ROLES, "any"], help="role of the victims"
    )
    p.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    p.add_argument(
        "--kill-signal", default="KILL", choices=sorted(SIGNALS), help="KILL, or STOP (a hang)"
    )
    p.add_argument("--num-prompts", type=int, default=64, help="requests of the load")
    p.add_argument("--request-rate", type=float, default=4.0, help="requests per second")
    p.add_argument("--random-input-len", type=int, default=16, help="prompt length (words)")
    p.add_argument("--random-output-len", type=int, default=64, help="max_tokens per request")
    p.add_argument("--temperature", type=float, default=0.0, help="of every request")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds for the cluster to start"
    )
    p.add_argument("--result-name", default="chaos", help="results/<machine>/<name>.json")
    p.add_argument("--output", default=None, help="write the JSON here instead")
    p.add_argument(
        "--launch-arg",
        action="append",
        default=[],
        help="extra `afd launch` argument, e.g. --launch-arg=--max-num-seqs=128",
    )
    nodes = p.add_argument_group("a node (instead of workers)")
    nodes.add_argument(
        "--kill-node", type=int, default=None, help="SIGKILL this node of a 2-node cluster (1)"
    )
    nodes.add_argument("--streams", type=int, default=16, help="streams open at the kill")
    nodes.add_argument(
        "--node-timeout-s", type=float, default=10.0, help="the cluster's --node-timeout-s"
    )
    nodes.add_argument(
        "--restart", action="store_true", help="start the node again; time until it serves"
    )


def worker_pid(lines: list[str], role: str) -> int | None:
    """The current pid of the launcher's `role` worker, from its ready and recovery lines."""
    pid = None
    for line in list(lines):
        m = re.search(rf"{role} worker \d+ (?:ready \(pid|\(now pid) (\d+)", line)
        if m:
            pid = int(m.group(1))
    return pid


def recovery_times(lines: list[str]) -> list[float]:
    """Durations of the launcher's recoveries, in order."""
    found = (re.search(r"recovered in ([\d.]+) s", line) for line in list(lines))
    return [float(m.group(1)) for m in found if m]


def metric_total(text: str, name: str) -> float:
    """The sum of a /metrics page's samples called `name` over their labels (the server labels
    each with its model names); ValueError when the page has none, never a silent 0."""
    from afd.entrypoints.metrics import parse_prometheus_text

    found = [v for (sample, _), v in parse_prometheus_text(text).items() if sample == name]
    if not found:
        raise ValueError(f"the server's /metrics has no {name} sample")
    return sum(found)


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench chaos`; 0 when no request failed (workers), or when every
    stream ended and the cluster turned 503 (and, with --restart, served the same text again)."""
    from afd.results import write_result

    config = _checked_config(args)
    chaos = node_chaos if args.kill_node is not None else worker_chaos
    payload, ok = chaos(args, config)
    path = write_result(args.result_name, payload, path=args.output, device=args.device)
    print(f"results written to {path}")
    return 0 if ok else 1


def _checked_config(args: argparse.Namespace):
    """The engine config of the run; ValueError naming the flag for what cannot run."""
    from afd.config import WORKER_POOLS
    from afd.entrypoints.flags import engine_config_from_args

    config = engine_config_from_args(args)  # checks every engine flag, fills in the pools
    vars(args).update({name: getattr(config.cluster, name) for name in WORKER_POOLS})
    if not args.num_attention_workers or not args.num_expert_workers:
        raise ValueError("bench chaos needs a disaggregated cluster (attention and expert workers)")
    if args.kill_worker == "prefill" and not args.num_prefill_workers:
        raise ValueError("--kill-worker prefill needs --num-prefill-workers >= 1")
    if not 0 < args.kill_every < 1e6:
        raise ValueError("--kill-every must be a positive number of seconds")
    if args.kill_node is not None and args.kill_node != 1:
        raise ValueError("--kill-node: the cluster has nodes 0 and 1, and node 0 serves: give 1")
    if not 1 <= args.streams <= 1024:
        raise ValueError("--streams must be between 1 and 1024")
    if not 0 < args.node_timeout_s < 1e6:
        raise ValueError("--node-timeout-s must be a positive number of seconds")
    return config


def _topology(args: argparse.Namespace) -> dict:
    return {
        "prefill": args.num_prefill_workers,
        "attention": args.num_attention_workers,
        "expert": args.num_expert_workers,
        "micro_batches": args.num_micro_batches,
        "model": args.model,
    }


def _print_rows(title: str, rows: list[tuple[str, object]]) -> None:
    print("{s:{c}^60}".format(s=f" {title} ", c="-"))
    for label, value in rows:
        shown = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else value
        print(f"{label:<44}{shown!s:>16}")


# -- workers ------------------------------------------------------------------------------------


def worker_chaos(args: argparse.Namespace, config) -> tuple[dict, bool]:
    """The load run with worker kills: ({"chaos": ..., "serve": ...}, no request failed)."""
    from afd.benchmarks import serve

    port = free_port()
    server = start_server(launch_argv(config, port, args.launch_arg), port)
    kills: list[dict] = []
    try:
        server.wait_healthy(args.startup_timeout)
        done = threading.Event()
        thread = threading.Thread(target=_killer, args=(args, server, kills, done), daemon=True)
        thread.start()
        try:
            metrics = asyncio.run(serve.benchmark(_load(args, server.base)))
        finally:
            done.set()
            thread.join()
        # let the last recovery finish before reading the counts
        deadline = time.monotonic() + args.startup_timeout
        while time.monotonic() < deadline and len(recovery_times(server.lines)) < len(kills):
            time.sleep(0.5)
        recomputed = int(_metric(server, "afd:requests_recomputed_total"))
    finally:
        server.stop()
    chaos = _worker_summary(args, kills, recovery_times(server.lines), metrics, recomputed)
    print(serve.format_table(metrics, [50.0, 99.0]))
    _print_rows("Chaos", [("Kills:", chaos["kills"]), ("Recoveries:", chaos["recoveries"]),
                          ("Recovery p50 (s):", chaos["recovery_p50_s"]),
                          ("Recovery max (s):", chaos["recovery_max_s"]),
                          ("Requests failed:", chaos["requests_failed"]),
                          ("Requests recomputed:", chaos["requests_recomputed"])])  # fmt: skip
    return {"chaos": chaos, "serve": metrics}, metrics["failed"] == 0


def _killer(args: argparse.Namespace, server: Launched, kills: list[dict], done) -> None:
    """Every --kill-every seconds until `done`: --kill-signal to the next role's worker."""
    roles = [r for r in ROLES if r != "prefill" or args.num_prefill_workers]
    order = roles if args.kill_worker == "any" else [args.kill_worker]
    i = 0
    while not done.wait(args.kill_every):
        role = order[i % len(order)]
        pid = worker_pid(server.lines, role)
        if pid is None:
            continue
        try:
            os.kill(pid, SIGNALS[args.kill_signal])
        except ProcessLookupError:
            continue
        kills.append({"role": role, "pid": pid, "at": time.monotonic()})
        print(f"chaos: {args.kill_signal} {role} worker (pid {pid})", flush=True)
        i += 1


def _load(args: argparse.Namespace, base: str) -> argparse.Namespace:
    """The `afd bench serve` settings of the load."""
    return argparse.Namespace(
        base_url=base, endpoint="/v1/completions", model=None, api_key=None,
        num_prompts=args.num_prompts, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=0.0,
        request_rate=args.request_rate, burstiness=1.0, max_concurrency=None,
        goodput=None, metric_percentiles="50,99", temperature=args.temperature,
        request_timeout=args.request_timeout, seed=args.seed or 0,
    )  # fmt: skip


def _metric(server: Launched, name: str) -> float:
    import httpx

    return metric_total(httpx.get(f"{server.base}/metrics", timeout=10).text, name)


def _worker_summary(args, kills: list[dict], times: list[float], metrics: dict, recomputed: int):
    return {
        "kill_worker": args.kill_worker,
        "kill_every_s": args.kill_every,
        "kill_signal": args.kill_signal,
        "kills": len(kills),
        "kills_by_role": {r: sum(k["role"] == r for k in kills) for r in ROLES},
        "recoveries": len(times),
        "recovery_seconds": times,
        "recovery_min_s": min(times) if times else None,
        "recovery_p50_s": statistics.median(times) if times else None,
        "recovery_max_s": max(times) if times else None,
        "requests_failed": metrics["failed"],
        "requests_recomputed": recomputed,
        "topology": _topology(args),
    }


# -- a node -------------------------------------------------------------------------------------


class _Streams:
    """`n` streaming completions in threads; when each got its first token and how it ended."""

    def __init__(self, base: str, args: argparse.Namespace):
        self.base, self.args = base, args
        self.first: list[float] = []
        self.ends: list[tuple[float, str]] = []  # (when, "complete" | "error" | "transport")
        self.lock = threading.Lock()
        self.all_started = threading.Event()
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True)
                        for i in range(args.streams)]  # fmt: skip

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, until: float) -> bool:
        """Wait for every stream to end, until monotonic `until`; True if all did."""
        for t in self.threads:
            t.join(timeout=max(0.0, until - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _one(self, i: int) -> None:
        import httpx

        words = " ".join(f"w{i}x{k}" for k in range(self.args.random_input_len))
        body = {"prompt": f"stream {i}: {words}", "max_tokens": self.args.random_output_len,
                "temperature": self.args.temperature, "ignore_eos": True,
                "stream": True}  # fmt: skip
        how, started = "complete", False
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body,
                              timeout=self.args.request_timeout) as r:  # fmt: skip
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if '"error"' in line:
                        how = "error"
                    elif not started:
                        started = True
                        self._started()
        except httpx.HTTPError:
            how = "transport"
        with self.lock:
            self.ends.append((time.monotonic(), how))

    def _started(self) -> None:
        with self.lock:
            self.first.append(time.monotonic())
            if len(self.first) == len(self.threads):
                self.all_started.set()


def _probe(base: str, timeout: float) -> tuple[int, str | None]:
    """A short greedy completion: (status, text or None)."""
    import httpx

    body = {"prompt": "The chaos probe says", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=timeout)
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else None


def _start_two_nodes(args: argparse.Namespace, config, folder: str) -> tuple[Launched, Launched]:
    """Node 1 (experts, by the default --node-roles) and node 0 (the rest and the API) on
    127.0.0.1, with a fresh secret, once /health is 200; each in a session of its own."""
    secret = Path(folder) / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    nodes = ["--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}",
             "--cluster-secret-file", str(secret),
             "--node-timeout-s", str(args.node_timeout_s)]  # fmt: skip
    port = free_port()
    node0_argv = launch_argv(config, port, [*args.launch_arg, "--node-rank", "0", *nodes])
    node1_argv = [*node0_argv[: node0_argv.index("--port")], "--node-rank", "1", *nodes,
                  *args.launch_arg]  # fmt: skip
    node1 = start_server(node1_argv)
    node0 = start_server(node0_argv, port)
    try:
        node0.wait_healthy(args.startup_timeout, node1)
    except BaseException:
        node0.kill(), node1.kill()
        raise
    return node0, node1


def node_chaos(args: argparse.Namespace, config) -> tuple[dict, bool]:
    """SIGKILL of node 1 during --streams streams (and --restart): ({"chaos": ...}, ok)."""
    with tempfile.TemporaryDirectory(prefix="afd-chaos-") as folder:
        node0, node1 = _start_two_nodes(args, config, folder)
        try:
            chaos = _kill_node(args, node0, node1)
            if args.restart:
                node1 = start_server(list(node1.proc.args))  # the same command: it rejoins
                chaos.update(_rejoin(args, node0, node1, chaos["text_before"]))
            chaos["nodes_lost"] = int(_metric(node0, "afd:nodes_lost_total"))
            chaos["requests_recomputed"] = int(_metric(node0, "afd:requests_recomputed_total"))
        finally:
            node0.stop()
            node1.kill()
    chaos.update(kill_node=args.kill_node, restart=args.restart, topology=_topology(args))
    _print_rows("Chaos: a node", [(f"{k}:", v) for k, v in chaos.items()
                                  if not isinstance(v, dict | str)])  # fmt: skip
    ok = chaos["streams_ended"] == args.streams and chaos["time_to_503_s"] is not None
    if args.restart:
        ok &= bool(chaos.get("same_text_after_rejoin"))
    return {"chaos": chaos}, ok


def _kill_node(args: argparse.Namespace, node0: Launched, node1: Launched) -> dict:
    """Open the streams, SIGKILL node 1's group once each has a token, time what follows."""
    status, before = _probe(node0.base, args.request_timeout)
    if status != 200:
        raise RuntimeError(f"the probe before the kill got HTTP {status}:\n{node0.tail()}")
    streams = _Streams(node0.base, args)
    streams.start()
    if not streams.all_started.wait(args.request_timeout):
        raise RuntimeError("the streams did not all start:\n" + node0.tail())
    node1.kill()
    killed = time.monotonic()
    print(f"chaos: SIGKILL of node {args.kill_node} (pid group {node1.proc.pid})", flush=True)
    limit = killed + args.node_timeout_s + args.startup_timeout
    unhealthy = None
    while unhealthy is None and time.monotonic() < limit:
        if node0.health() == 503:
            unhealthy = time.monotonic() - killed
        else:
            time.sleep(0.1)
    streams.join(limit)
    refused, _ = _probe(node0.base, args.request_timeout)  # a new request while the node is lost
    ends = [how for _, how in streams.ends]
    return {
        "streams": args.streams,
        "node_timeout_s": args.node_timeout_s,
        "time_to_503_s": unhealthy,
        "time_to_streams_ended_s": max((t for t, _ in streams.ends), default=killed) - killed,
        "streams_ended": len(ends),
        "requests_failed": sum(how != "complete" for how in ends),
        "requests_completed": ends.count("complete"),
        "new_request_while_lost": refused,
        "text_before": before,
    }


def _rejoin(args: argparse.Namespace, node0: Launched, node1: Launched, before: str) -> dict:
    """Node 1 started again: seconds until node 0 serves, and whether the probe gives the text
    it gave before the loss."""
    serve_s = node0.wait_healthy(args.startup_timeout, node1)
    status, after = _probe(node0.base, args.request_timeout)
    return {
        "time_to_serve_after_restart_s": serve_s,
        "probe_after_rejoin": status,
        "same_text_after_rejoin": after == before,
    }

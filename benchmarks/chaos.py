"""`afd bench chaos`: kill workers of a local cluster at intervals during a load run.

Starts `afd launch` with the given topology, runs the `afd bench serve` load against it, and
every `--kill-every` seconds sends `--kill-signal` to the current worker of `--kill-worker`
(`any` takes expert, attention and prefill in turn). Reports, next to the serving table: kills,
recoveries, recovery time p50/max (from the launcher's "recovered in" lines), requests failed
(the target is 0) and requests recomputed (`afd:requests_recomputed_total` on the server's
/metrics; missing is an error). Writes the result with `afd.results.write_result`
(command, commit, machine, date inside).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

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


def _launch_argv(config, port: int, launch_args: list[str]) -> list[str]:
    """`afd launch` with every engine setting of this run (flags made from the config)."""
    from afd.entrypoints.flags import engine_argv

    argv = [sys.executable, "-m", "afd", "launch", *engine_argv(config), "--port", str(port)]
    return argv + list(launch_args)


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench chaos`; 0 when no request failed."""
    import httpx

    from afd.benchmarks import serve
    from afd.config import WORKER_POOLS
    from afd.entrypoints.flags import engine_config_from_args
    from afd.results import write_result

    config = engine_config_from_args(args)  # checks every engine flag, fills in the pools
    vars(args).update({name: getattr(config.cluster, name) for name in WORKER_POOLS})
    if not args.num_attention_workers or not args.num_expert_workers:
        raise ValueError("bench chaos needs a disaggregated cluster (attention and expert workers)")
    if args.kill_worker == "prefill" and not args.num_prefill_workers:
        raise ValueError("--kill-worker prefill needs --num-prefill-workers >= 1")
    if not 0 < args.kill_every < 1e6:
        raise ValueError("--kill-every must be a positive number of seconds")
    port = free_port()
    proc = subprocess.Popen(
        _launch_argv(config, port, args.launch_arg),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    kills: list[dict] = []
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the cluster did not start:\n" + "".join(lines[-20:]))
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        roles = [r for r in ROLES if r != "prefill" or args.num_prefill_workers]
        order = roles if args.kill_worker == "any" else [args.kill_worker]
        done = threading.Event()

        def killer() -> None:
            i = 0
            while not done.wait(args.kill_every):
                role = order[i % len(order)]
                pid = worker_pid(lines, role)
                if pid is None:
                    continue
                try:
                    os.kill(pid, SIGNALS[args.kill_signal])
                except ProcessLookupError:
                    continue
                kills.append({"role": role, "pid": pid, "at": time.monotonic()})
                print(f"chaos: {args.kill_signal} {role} worker (pid {pid})", flush=True)
                i += 1

        load = argparse.Namespace(
            base_url=base, endpoint="/v1/completions", model=None, api_key=None,
            num_prompts=args.num_prompts, random_input_len=args.random_input_len,
            random_output_len=args.random_output_len, random_range_ratio=0.0,
            request_rate=args.request_rate, burstiness=1.0, max_concurrency=None,
            goodput=None, metric_percentiles="50,99", temperature=args.temperature,
            request_timeout=args.request_timeout, seed=args.seed or 0,
        )  # fmt: skip
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            metrics = asyncio.run(serve.benchmark(load))
        finally:
            done.set()
            thread.join()
        # let the last recovery finish before reading the counts
        deadline = time.monotonic() + args.startup_timeout
        while time.monotonic() < deadline and len(recovery_times(lines)) < len(kills):
            time.sleep(0.5)
        text = httpx.get(f"{base}/metrics", timeout=10).text
        recomputed = int(metric_total(text, "afd:requests_recomputed_total"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    times = recovery_times(lines)
    chaos = {
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
        "topology": {
            "prefill": args.num_prefill_workers,
            "attention": args.num_attention_workers,
            "expert": args.num_expert_workers,
            "micro_batches": args.num_micro_batches,
            "model": args.model,
        },  # fmt: skip
    }
    print(serve.format_table(metrics, [50.0, 99.0]))
    print("{s:{c}^60}".format(s=" Chaos ", c="-"))
    for label, value in [("Kills:", chaos["kills"]), ("Recoveries:", chaos["recoveries"]),
                         ("Recovery p50 (s):", chaos["recovery_p50_s"]),
                         ("Recovery max (s):", chaos["recovery_max_s"]),
                         ("Requests failed:", chaos["requests_failed"]),
                         ("Requests recomputed:", chaos["requests_recomputed"])]:  # fmt: skip
        shown = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else value
        print(f"{label:<44}{shown:>16}")
    path = write_result(args.result_name, {"chaos": chaos, "serve": metrics}, path=args.output,
                        device=args.device)  # fmt: skip
    print(f"results written to {path}")
    return 0 if metrics["failed"] == 0 else 1

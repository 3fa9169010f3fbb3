"""`afd launch`: start a local AFD cluster and serve the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from afd.entrypoints.cli import add_engine_args

    add_engine_args(p)
    p.set_defaults(num_prefill_workers=1, num_attention_workers=1, num_expert_workers=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--max-queue-len",
        type=int,
        default=1024,
        help="requests waiting beyond this are refused with HTTP 503",
    )
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the cluster")
    p.add_argument("--node-rank", type=int, default=0, help="this node (0 serves HTTP)")
    p.add_argument("--dist-init-addr", default=None, help="HOST:PORT of node 0 (nnodes > 1)")
    p.add_argument(
        "--node-roles",
        default=None,
        help="which roles run where, e.g. '0=prefill,attention;1=expert' (the default)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="cluster.yaml whose keys are these flags' names; flags given here override it",
    )


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Use a --config YAML's values as defaults, so explicit flags still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    import yaml

    try:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read --config {known.config}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"--config {known.config} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {known.config} must be a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    settings = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in dests or dest in ("config", "help"):
            raise ValueError(f"--config {known.config}: unknown setting {key!r}")
        settings[dest] = value
    parser.set_defaults(**settings)


DEATH_GRACE_S = 10.0


def run(args: argparse.Namespace) -> int:
    import threading
    import time

    import uvicorn

    from afd.engine.async_engine import AsyncEngine
    from afd.entrypoints.cli import engine_config_from_args
    from afd.entrypoints.server import build_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be 1..65535, got {args.port}")
    config = engine_config_from_args(args)
    config.nnodes, config.dist_init_addr, config.node_roles = (
        args.nnodes,
        args.dist_init_addr,
        args.node_roles,
    )
    if not 0 <= args.node_rank < args.nnodes:
        raise ValueError(f"--node-rank must be in 0..{args.nnodes - 1}")
    if args.node_rank > 0:
        return run_worker_node(config, args.node_rank)
    if config.num_attention_workers:
        a, f, p = (
            config.num_attention_workers,
            config.num_expert_workers,
            config.num_prefill_workers,
        )
        print(
            f"afd: plan: {a} attention worker(s) (ranks 0..{a - 1}), {f} expert worker(s) "
            f"(ranks {a}..{a + f - 1}), {p} prefill worker(s)"
            + (f" (ranks {a + f}..{a + f + p - 1})" if p else "")
            + f"; m={config.num_micro_batches}, device={config.device}, model={config.model}",
            flush=True,
        )
    else:
        print(
            f"afd: plan: single process, device={config.device}, model={config.model}", flush=True
        )
    print("afd: loading model and starting workers ...", flush=True)
    if args.max_queue_len < 1:
        raise ValueError("--max-queue-len must be at least 1")
    config.extra["progress"] = True
    try:
        engine = AsyncEngine(config, max_queue_len=args.max_queue_len)
    except (RuntimeError, TimeoutError) as e:  # a worker failed to start: say which, exit 1
        print(f"afd: error: {e}", file=sys.stderr, flush=True)
        return 1
    app = build_app(engine, api_key=args.api_key)
    url = f"http://{args.host}:{args.port}/v1"
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    )
    print(
        f"afd: ready: OpenAI API at {url} (model '{engine.model_name}'); Ctrl-C stops", flush=True
    )
    failure: list[str] = []

    def watchdog() -> None:
        # A dead worker: /health says 503 and requests fail at once; after a grace period in
        # which clients can see that, the launcher stops everything and exits non-zero.
        while not server.should_exit:
            ok, reason = engine.health()
            if not ok:
                failure.append(reason)
                print(f"afd: error: {reason}; stopping in {DEATH_GRACE_S:.0f} s", file=sys.stderr,
                      flush=True)  # fmt: skip
                time.sleep(DEATH_GRACE_S)
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watchdog, name="afd-watchdog", daemon=True).start()
    try:
        server.run()
    finally:
        engine.shutdown()
        print("afd: stopped", file=sys.stderr, flush=True)
    return 1 if failure else 0


def run_worker_node(config, node_rank: int) -> int:
    """Node > 0: start this node's workers and keep them until node 0 shuts the cluster down."""
    import signal
    import time

    from afd.builtin import resolve_model
    from afd.config import ModelConfig
    from afd.scheduler.cluster import layout_for, node_supervisor, spawn_node_workers, worker_spec
    from afd.scheduler.supervisor import WorkerDiedError

    if config.nnodes < 2 or not config.num_attention_workers:
        raise ValueError("--node-rank > 0 needs --nnodes > 1 and a disaggregated cluster")
    path = resolve_model(config.model)
    model_config = ModelConfig.from_pretrained(path)
    layout = layout_for(config, model_config)
    spec = worker_spec(config, path, model_config, layout)
    supervisor = node_supervisor(config)  # replaces this node's workers when they fail
    spawn_node_workers(supervisor, spec, layout, node_rank)
    supervisor.enable_restarts()
    roles = [f"{w.role} {w.rank}" for w in supervisor.workers]
    print(f"afd: node {node_rank}: workers {', '.join(roles) or 'none'}; "
          f"cluster at {config.dist_init_addr}", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = 0
    try:
        while True:
            try:
                supervisor.check()
            except WorkerDiedError as e:  # told to stop by node 0, or out of restarts
                supervisor.restarting = False
                supervisor.shutdown(grace=5.0)  # node 0 said shutdown: the rest follow
                if any(w.process.exitcode != 0 for w in supervisor.workers):
                    print(f"afd: node {node_rank}: {e}", file=sys.stderr, flush=True)
                    code = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.shutdown()
    print(f"afd: node {node_rank}: stopped", file=sys.stderr, flush=True)
    return code

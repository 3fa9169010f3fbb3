"""`afd serve MODEL` (alias `afd launch`): start a local AFD cluster and serve the OpenAI API
over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

from afd.entrypoints.serving import ServerConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    from afd.entrypoints.cli import _text, add_engine_args

    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as --model: a directory, a built-in tiny model or a Hugging Face Hub id "
        "(org/name) (default: --model's)",
    )
    add_engine_args(p, workers=1)
    p.add_argument(
        "--served-model-name",
        nargs="+",
        type=_text,
        default=None,
        metavar="NAME",
        help="names requests may give as 'model'; the first is the one reported (default: the "
        "model as given)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP API listens on")
    p.add_argument("--port", type=int, default=8000, help="port of the HTTP API")
    p.add_argument(
        "--api-key",
        type=_text,
        default=os.environ.get("AFD_API_KEY") or os.environ.get("VLLM_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
        "(default: $AFD_API_KEY, else $VLLM_API_KEY, else no key)",
    )
    p.add_argument(
        "--protect-metrics",
        action="store_true",
        help="require the API key on /metrics too",
    )
    p.add_argument(
        "--max-queue-len",
        type=int,
        default=1024,
        help="sequences (n per request) waiting beyond --max-num-seqs are refused with HTTP 503",
    )
    p.add_argument(
        "--max-request-body-mb",
        type=float,
        default=16.0,
        help="larger request bodies get HTTP 413 before they are read",
    )
    p.add_argument(
        "--http-header-timeout-s",
        type=float,
        default=10.0,
        help="a connection that has not sent a whole request line and headers this long "
        "after it opened (or after its last response) is closed",
    )
    p.add_argument(
        "--http-body-timeout-s",
        type=float,
        default=60.0,
        help="a request body not complete this long after its headers gets HTTP 408",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="seconds SIGINT/SIGTERM lets running requests finish before aborting them; new "
        "ones get 503 at once, a second signal stops at once",
    )
    p.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="no log line per request (id, status, tokens, latency)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="level of AFD's log (stderr): requests are logged at info",
    )
    p.add_argument(
        "--uvicorn-log-level",
        default="warning",
        choices=["trace", *LOG_LEVELS],
        help="level of uvicorn's own log",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="accepted for vLLM compatibility: AFD always runs eagerly (no CUDA graphs)",
    )
    p.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="accepted for vLLM compatibility: AFD logs no periodic stats (see /metrics)",
    )
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the cluster")
    p.add_argument("--node-rank", type=int, default=0, help="this node (0 serves HTTP)")
    p.add_argument("--dist-init-addr", default=None, help="HOST:PORT of node 0 (nnodes > 1)")
    p.add_argument(
        "--node-roles",
        default=None,
        help="which roles run where, e.g. '0=prefill,attention;1=expert' (default: node 0 "
        "prefill and attention, the others experts)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="cluster.yaml whose keys are these flags' names; flags given here override it",
    )


LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The HTTP layer's settings; CLIError for values it cannot work with."""
    from afd.entrypoints.cli import CLIError

    if args.api_key is not None and not re.fullmatch(r"[\x21-\x7e]+", args.api_key):
        raise CLIError("--api-key must be visible ASCII without spaces (it travels in a header)")
    names = args.served_model_name
    if names is not None and len(set(names)) != len(names):
        raise CLIError("--served-model-name lists a name twice")
    if not 1 <= args.max_queue_len <= 1 << 30:
        raise CLIError("--max-queue-len must be at least 1")
    if not 1 / 1024 <= args.max_request_body_mb <= 1 << 20:  # also NaN
        raise CLIError("--max-request-body-mb must be between 0.001 and 1048576")
    for name in ("http_header_timeout_s", "http_body_timeout_s", "shutdown_timeout"):
        value = getattr(args, name)
        if not 0 < value <= 86400:  # also NaN and inf
            raise CLIError(f"--{name.replace('_', '-')} must be a number of seconds in (0, 86400]")
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be 1..65535, got {args.port}")
    return ServerConfig(
        api_key=args.api_key,
        served_model_names=names,
        protect_metrics=args.protect_metrics,
        max_body_bytes=int(args.max_request_body_mb * 2**20),
        header_timeout_s=args.http_header_timeout_s,
        body_timeout_s=args.http_body_timeout_s,
        shutdown_timeout_s=args.shutdown_timeout,
        log_requests=not args.disable_log_requests,
        enable_tokenizer_info_endpoint=getattr(args, "enable_tokenizer_info_endpoint", False),
    )


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (not when made)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str) -> None:
    """AFD's loggers to stderr at `level`."""
    log = logging.getLogger("afd")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level.upper())


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


def _model_from_args(args: argparse.Namespace) -> None:
    from afd.entrypoints.cli import CLIError

    if args.model_tag is None:
        return
    given = "--model" in args.command_argv or any(
        a.startswith("--model=") for a in args.command_argv
    )
    if given and args.model != args.model_tag:
        raise CLIError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from afd.entrypoints.cli import CLIError, engine_config_from_args
    from afd.scheduler.cluster import listen_socket

    setup_logging(args.log_level)
    _model_from_args(args)
    server_config = server_config_from_args(args)
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
    # the port first: a busy one fails now, in one line, not after the model loaded
    try:
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    # SIGTERM while loading unwinds like Ctrl-C, so workers and temp folders are cleaned up
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _serve(args, config, server_config, sock)
    except KeyboardInterrupt:
        print("afd: stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        sock.close()
        signal.signal(signal.SIGTERM, previous_term)


def transport_label(config) -> str:
    """The A<->F transport a cluster of `config` uses, as the start-up line names it: `shm
    (auto)` when --comm-backend auto chose it."""
    from afd.comm.dispatch import resolve_transport_name
    from afd.scheduler.cluster import shares_gpus

    one_node = config.nnodes == 1
    name = resolve_transport_name(
        config.comm_backend,
        config.device,
        "-" if one_node else None,  # shm needs every worker on one host
        one_node and shares_gpus(config),
    )
    return f"{name} (auto)" if config.comm_backend == "auto" else name


def _serve(args, config, server_config, sock) -> int:
    import threading
    import time

    from afd.engine.async_engine import AsyncEngine
    from afd.entrypoints.server import build_app
    from afd.entrypoints.serving import ServerState, make_server

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
            + f"; m={config.num_micro_batches}, transport={transport_label(config)}, "
            f"device={config.device}, model={config.model}",
            flush=True,
        )
    else:
        print(
            f"afd: plan: single process, device={config.device}, model={config.model}", flush=True
        )
    print("afd: loading model and starting workers ...", flush=True)
    config.extra["progress"] = True
    try:
        engine = AsyncEngine(config, max_queue_len=args.max_queue_len)
    except (RuntimeError, TimeoutError) as e:  # a worker failed to start: say which, exit 1
        print(f"afd: error: {e}", file=sys.stderr, flush=True)
        return 1
    try:
        state = ServerState()
        app = build_app(engine, server_config, state=state)
        server = make_server(app, server_config, state, args.uvicorn_log_level)
        names = server_config.served_model_names or [engine.model_name]
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"afd: ready: OpenAI API at http://{host}:{args.port}/v1 (model "
            f"{', '.join(repr(n) for n in names)}); Ctrl-C stops",
            flush=True,
        )
        failure: list[str] = []

        def watchdog() -> None:
            # A dead cluster: /health says 503 and requests fail at once; after a grace period
            # in which clients can see that, the launcher stops everything and exits non-zero.
            while not server.should_exit:
                ok, reason = engine.health()
                if not ok:
                    failure.append(reason)
                    print(f"afd: error: {reason}; stopping in {DEATH_GRACE_S:.0f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
                    time.sleep(DEATH_GRACE_S)
                    server.begin_shutdown("the cluster cannot serve")
                    server.abort_in_flight()
                    return
                time.sleep(0.5)

        threading.Thread(target=watchdog, name="afd-watchdog", daemon=True).start()
        server.run(sockets=[sock])
    finally:
        # the clean-up (workers, shm segments, temp folders) is bounded: no signal cuts it short
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
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
    path = resolve_model(config.model, config.revision, config.download_dir)
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

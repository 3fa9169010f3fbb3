"""`afd serve MODEL` (alias `afd launch`): start a local AFD cluster and serve the OpenAI API
over HTTP."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import msgspec

from afd.comm import cleanup
from afd.entrypoints.flags import (
    CLIError,
    add_engine_args,
    add_flags,
    engine_config_from_args,
    flag_values,
)
from afd.entrypoints.serving import ServerConfig
from afd.options import check_int, option
from afd.process import raise_interrupt, setup_logging
from afd.threads import API_THREADS, set_torch_threads


@dataclass(frozen=True)
class ProcessConfig:
    """How `afd serve` splits into processes (vLLM v1: the engine core in a process of its own,
    --api-server-count)."""

    engine_core_process: bool = option(
        True,
        "run the engine core (scheduler, executor, request state) in a process of its own, "
        "the HTTP server and tokenization in another, talking over ZMQ; "
        "--no-engine-core-process keeps it in the HTTP server's process",
        scope="server",
        negatable=True,
    )
    api_server_count: int = option(
        1,
        "HTTP API processes sharing the port against one engine core",
        scope="server",
    )

    def __post_init__(self) -> None:
        check_int("--api-server-count", self.api_server_count, 1, 64)
        if self.api_server_count > 1 and not self.engine_core_process:
            raise ValueError("--api-server-count > 1 needs the engine-core process "
                             "(drop --no-engine-core-process)")  # fmt: skip

    @property
    def split(self) -> bool:
        return self.engine_core_process


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`afd serve`'s flags: the engine's (multi-node ones included), the server's, and the
    launcher's own (--node-rank, --config)."""
    p.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as --model: a directory, a built-in tiny model or a Hugging Face Hub id "
        "(org/name) (default: --model's)",
    )
    add_engine_args(p, workers=1, nodes=True)
    server = p.add_argument_group("server")
    add_flags(server, ServerConfig, scopes=("server",))
    add_flags(server, ProcessConfig, scopes=("server",))
    server.add_argument(
        "--enforce-eager",
        action="store_true",
        help="accepted for vLLM compatibility: AFD always runs eagerly (no CUDA graphs)",
    )
    server.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="accepted for vLLM compatibility: AFD logs no periodic stats (see /metrics)",
    )
    p.add_argument("--node-rank", type=int, default=0, help="this node (0 serves HTTP)")
    p.add_argument(
        "--config",
        default=None,
        help="cluster.yaml whose keys are these flags' names; flags given here override it",
    )


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The HTTP layer's settings; ValueError naming the flag for values it cannot work with."""
    return ServerConfig(**flag_values(ServerConfig, args))


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
    if args.model_tag is None:
        return
    given = "--model" in args.command_argv or any(
        a.startswith("--model=") for a in args.command_argv
    )
    if given and args.model != args.model_tag:
        raise CLIError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
    args.model = args.model_tag


def run(args: argparse.Namespace) -> int:
    from afd.comm.net import listen_socket

    _model_from_args(args)
    server_config = server_config_from_args(args)
    processes = ProcessConfig(**flag_values(ProcessConfig, args))
    setup_logging(server_config.log_level)
    cleanup.remove_stale()  # what crashed clusters left in /dev/shm and the temp folder
    config = engine_config_from_args(args)
    nnodes = config.cluster.nnodes
    if not 0 <= args.node_rank < nnodes:
        raise ValueError(f"--node-rank must be in 0..{nnodes - 1}")
    if nnodes > 1 and config.cluster.cluster_secret_file is None:
        # a generated secret cannot reach the other nodes; without one any host could join
        raise ValueError("--nnodes > 1 needs --cluster-secret-file PATH (the same on every node)")
    if args.node_rank > 0:
        return run_worker_node(config, args.node_rank)
    # the port first: a busy one fails now, in one line, not after the model loaded
    host, port = server_config.host, server_config.port
    try:
        sock = listen_socket(host, port)
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # SIGTERM while loading unwinds like Ctrl-C, so workers and temp folders are cleaned up
    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return _serve(config, server_config, sock, processes)
    except KeyboardInterrupt:
        print("afd: stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        sock.close()
        signal.signal(signal.SIGTERM, previous_term)


def _start_core(config, server_config):
    """The engine-core process, started before this process imports the HTTP stack and the
    tokenizer, so its imports and model load run beside them (it prints the plan)."""
    from afd.engine.core_client import CoreProcess

    return CoreProcess(config.replace(progress=True), server_config.max_queue_len,
                       server_config.log_level)  # fmt: skip


def _preload_api_imports() -> None:
    """What the API process needs anyway (FastAPI, transformers' tokenizer), imported while
    the core loads rather than after it is ready."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    import afd.entrypoints.server  # noqa: F401

    set_torch_threads(API_THREADS)  # they import torch; its threads would take the core's cores


def _start_engine(config, server_config, core):
    """The EngineClient: a client of the started core, or the engine in this process."""
    if core is not None:
        from afd.engine.core_client import connect_core

        return connect_core(core)
    from afd.engine.async_engine import AsyncEngine

    config = config.replace(progress=True)
    return AsyncEngine(config, max_queue_len=server_config.max_queue_len)


def watch_engine(engine, server, failure: list[str]) -> None:
    """A dead cluster: /health says 503 and requests fail at once; after a grace period in
    which clients can see that, the server stops and its process exits non-zero. A cluster
    waiting for a lost node to rejoin is not dead: the server stays up (503 meanwhile)."""
    from afd.scheduler.core.step import waiting_for_node

    while not server.should_exit:
        ok, reason = engine.health()
        if not ok and not waiting_for_node(reason):
            failure.append(reason)
            print(f"afd: error: {reason}; stopping in {DEATH_GRACE_S:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(DEATH_GRACE_S)
            server.begin_shutdown("the cluster cannot serve")
            server.abort_in_flight()
            return
        time.sleep(0.5)


def _serve(config, server_config, sock, processes: ProcessConfig) -> int:
    from afd.engine.core_client import CoreStartError

    core = _start_core(config, server_config) if processes.split else None
    try:
        if core is None:
            from afd.scheduler.cluster.executor import print_plan

            print_plan(config)
        else:
            _preload_api_imports()
        engine = _start_engine(config, server_config, core)
    except CoreStartError as e:  # the core said why
        return e.exit_code
    except (RuntimeError, TimeoutError) as e:  # a worker failed to start: say which, exit 1
        print(f"afd: error: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException:  # Ctrl-C while loading: the core unwinds its workers
        if core is not None:
            core.stop(timeout=0)
        raise
    from afd.entrypoints.server import build_app
    from afd.entrypoints.serving import ServerState, make_server

    children: list[subprocess.Popen] = []
    try:
        for index in range(1, processes.api_server_count):
            children.append(start_api_process(engine, server_config, sock, index))
        state = ServerState()
        app = build_app(engine, server_config, state=state)
        server = make_server(app, server_config, state, server_config.uvicorn_log_level)
        names = server_config.served_model_names or [engine.model_name]
        host = server_config.host
        host = f"[{host}]" if ":" in host else host
        count = processes.api_server_count
        print(
            f"afd: ready: OpenAI API at http://{host}:{server_config.port}/v1 (model "
            f"{', '.join(repr(n) for n in names)})"
            + (f", {count} API processes" if count > 1 else "")
            + "; Ctrl-C stops",
            flush=True,
        )
        failure: list[str] = []
        args = (engine, server, failure)
        threading.Thread(target=watch_engine, args=args, name="afd-watchdog", daemon=True).start()
        server.run(sockets=[sock])
    finally:
        # the clean-up (workers, shm segments, temp folders) is bounded: no signal cuts it short
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        stop_api_processes(children, server_config.shutdown_timeout_s + 10.0)
        engine.shutdown()
        print("afd: stopped", file=sys.stderr, flush=True)
    return 1 if failure else 0


# -- more API processes (--api-server-count) ------------------------------------------------


class APIProcessSpec(msgspec.Struct, forbid_unknown_fields=True):
    """What an extra API process reads on stdin: its slot, the core and the server settings;
    the listening socket comes as an inherited file descriptor (all accept on one socket)."""

    index: int
    socket_fd: int
    core_pid: int
    core_folder: str
    server: ServerConfig


def start_api_process(engine, server_config: ServerConfig, sock, index: int) -> subprocess.Popen:
    """API process `index`, serving the same socket against `engine`'s core."""
    spec = APIProcessSpec(
        index, sock.fileno(), engine.core_pid, engine.addresses.folder, server_config
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "afd.entrypoints.launch"],
        stdin=subprocess.PIPE,
        pass_fds=[sock.fileno()],
    )
    assert proc.stdin is not None
    proc.stdin.write(msgspec.msgpack.encode(spec))
    proc.stdin.close()
    return proc


def stop_api_processes(children: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM (each drains its requests), then SIGKILL past `timeout`."""
    for proc in children:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in children:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _watch_parent(server, parent: int) -> None:
    from afd.engine.core import pid_alive

    while not server.should_exit:
        if not pid_alive(parent):  # the launcher is gone: no orphan
            server.begin_shutdown("the launcher stopped")
            server.abort_in_flight()
            return
        time.sleep(0.5)


def api_process_main() -> int:
    """An extra API process: HTTP and tokenization against the launcher's engine core."""
    from afd.engine.core_client import CoreAddresses, CoreClient
    from afd.entrypoints.server import build_app
    from afd.entrypoints.serving import ServerState, make_server

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the server handles it
    spec = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=APIProcessSpec)
    config = spec.server
    setup_logging(config.log_level)
    set_torch_threads(API_THREADS)
    sock = socket.socket(fileno=spec.socket_fd)
    engine = CoreClient(CoreAddresses.at(spec.core_folder), spec.core_pid, spec.index)
    try:
        state = ServerState()
        server = make_server(build_app(engine, config, state=state), config, state,
                             config.uvicorn_log_level)  # fmt: skip
        failure: list[str] = []
        for target, args in ((watch_engine, (engine, server, failure)),
                             (_watch_parent, (server, os.getppid()))):  # fmt: skip
            threading.Thread(target=target, args=args, daemon=True).start()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 1 if failure else 0


def run_worker_node(config, node_rank: int) -> int:
    """Node > 0: start this node's workers and keep them until node 0 shuts the cluster down."""
    import signal
    import time

    from afd.builtin import resolve_model, resolve_tokenizer
    from afd.comm.auth import install_secret
    from afd.config import ModelConfig
    from afd.scheduler.cluster.executor import (
        layout_for,
        node_supervisor,
        spawn_node_workers,
        worker_spec,
    )
    from afd.scheduler.cluster.lease import DriverLease
    from afd.scheduler.cluster.supervisor import WorkerDiedError

    cluster, source = config.cluster, config.source
    if cluster.nnodes < 2 or not cluster.num_attention_workers:
        raise ValueError("--node-rank > 0 needs --nnodes > 1 and a disaggregated cluster")
    path = resolve_model(source.model, source.revision, source.download_dir)
    model_config = ModelConfig.from_pretrained(path)
    layout = layout_for(config, model_config)
    tokenizer = resolve_tokenizer(source.tokenizer, source.download_dir, path)
    spec = worker_spec(config, path, model_config, layout, tokenizer)
    install_secret(cluster.cluster_secret_file)  # the workers inherit it (environment)
    supervisor = node_supervisor(config)  # replaces this node's workers when they fail
    spawn_node_workers(supervisor, spec, layout, node_rank)
    supervisor.enable_restarts()
    roles = [f"{w.role} {w.rank}" for w in supervisor.workers]
    print(f"afd: node {node_rank}: workers {', '.join(roles) or 'none'}; "
          f"cluster at {cluster.dist_init_addr}", flush=True)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    lease = DriverLease(layout.host, layout.port, config.failure.node_timeout_s)
    code = 0
    try:
        while True:
            if not lease.probe() and (silent := lease.lapsed()) is not None:
                print(f"afd: node {node_rank}: node 0 lost: no answer at {cluster.dist_init_addr} "
                      f"for {silent:.1f} s (--node-timeout-s "
                      f"{config.failure.node_timeout_s:g}); stopping", file=sys.stderr,
                      flush=True)  # fmt: skip
                code = 1
                break
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


if __name__ == "__main__":
    sys.exit(api_process_main())

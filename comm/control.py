"""Control plane between the driver (scheduler) and workers: ZMQ over IPC or TCP, signed
msgpack (comm/auth); and the worker main loop every role shares (start-up, data-plane
generations, steps, aborts). The driver binds every socket, so a replacement worker connects to
the same addresses."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import timedelta

import zmq

from afd.comm import auth, cleanup, liveness, wire
from afd.comm import dist as afd_dist
from afd.comm.messages import (
    Abort,
    Aborted,
    Error,
    Joined,
    Plan,
    Ready,
    Reform,
    ReformFailed,
    Shutdown,
    StepFailed,
    ToWorker,
    WorkerMessage,
    WorkerSpec,
)

RECV_SLICE_MS = 100


def ipc_dir() -> str:
    """A folder for the control sockets (removed by a later start if this process dies)."""
    return cleanup.owned_dir("ipc")


def shm_dir() -> str:
    """A folder for the shm transport's segments: in /dev/shm (RAM) where there is one."""
    return cleanup.owned_dir("shm", cleanup.shm_parent())


def generation_dir(shm: str | None, generation: int) -> str | None:
    """The shm transport's folder of one data-plane generation (segments and FIFOs of an
    abandoned generation may hold half-written exchanges, so each generation starts empty)."""
    return None if not shm else os.path.join(shm, f"g{generation}")


def remove_generation_dirs(shm: str | None, keep: int) -> None:
    """Remove the folders of generations before `keep`."""
    if not shm or not os.path.isdir(shm):
        return
    for name in os.listdir(shm):
        if name.startswith("g") and name[1:].isdigit() and int(name[1:]) < keep:
            shutil.rmtree(os.path.join(shm, name), ignore_errors=True)


class WorkerChannel:
    """A worker's two sockets: plans in from the driver (a DEALER that first says a signed
    hello), results out to it. Every message out
    carries the worker's incarnation (`inc`, new for each process) and data-plane generation
    (`gen`), so the driver can tell a replacement's messages from its predecessor's."""

    def __init__(self, spec: WorkerSpec, role: str):
        self.role, self.rank = role, spec.rank
        self.inc = int.from_bytes(os.urandom(6), "little")
        self.gen = -1
        self.pending: ToWorker | None = None  # a driver message that came in mid-step
        self.lock = threading.Lock()  # the inbox is read by the main and the watcher thread
        self.ctx = zmq.Context()
        self.sealer = auth.Sealer()
        self.opener = auth.Opener(auth.plan_tag(self.rank))
        # the driver sends plans only to the connection whose signed hello claims this rank
        self.inbox = self.ctx.socket(zmq.DEALER)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.connect(spec.inbox_addrs[self.rank])
        self.inbox.send(self.sealer.seal(auth.hello_tag(self.rank), b""))
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(spec.driver_addr)

    def _take(self) -> ToWorker | None:
        """The waiting driver message; None for one dropped (forged, replayed, unsigned)."""
        raw = self.opener.open(self.inbox.recv())
        return None if raw is None else wire.decode_to_worker(raw)

    def recv(self) -> ToWorker:
        """The next driver message; waiting for it counts as progress (liveness)."""
        while True:
            with self.lock:
                if self.pending is not None:
                    msg, self.pending = self.pending, None
                    return msg
                if self.inbox.poll(RECV_SLICE_MS):
                    liveness.beat()
                    msg = self._take()
                    if msg is not None:
                        return msg
            liveness.beat()

    def driver_message(self) -> bool:
        """Whether the driver sent a message (kept for recv()); during a step the driver only
        writes to abort it. Called by the main thread and by liveness's watcher thread."""
        with self.lock:
            while self.pending is None and self.inbox.poll(0):
                self.pending = self._take()
            return self.pending is not None

    def send(self, kind: type[WorkerMessage], **fields) -> None:
        """A message of record type `kind` with this worker's rank, incarnation, generation."""
        msg = kind(rank=self.rank, inc=self.inc, gen=self.gen, **fields)
        self.outbox.send(self.sealer.seal(auth.DRIVER_TAG, wire.encode(msg)))

    def report_error(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            self.send(Error, role=self.role, message=text)
        except Exception:
            pass

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close()
        self.ctx.term()


_store = None  # the client of the driver's TCPStore, kept across generations


def init_world(spec: WorkerSpec, generation: int = 0) -> None:
    """Join data-plane generation `generation`: a torch.distributed world over the driver's
    TCP store, under a key prefix of its own (one rank cannot rejoin a live group, so every
    generation is a new world of every rank)."""
    import torch.distributed as dist

    global _store
    host, _, port = spec.init_addr.rpartition(":")
    timeout = timedelta(seconds=spec.dist_timeout_s)
    if _store is None:
        _store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    # gloo when workers share a GPU (NCCL allows no two ranks on one GPU)
    backend = afd_dist.resolve_backend(spec.dist_backend, spec.device)
    afd_dist.init_world(
        spec.rank,
        spec.world_size,
        backend=backend,
        store=dist.PrefixStore(f"afd/g{generation}/", _store),
        device=spec.device,
        timeout_s=timeout.total_seconds(),
        combine_group=backend == "nccl",
    )


def transport_for(spec: WorkerSpec, model_config, device, generation: int = 0):
    """The dispatch/combine transport a worker of this cluster uses (spec from worker_spec)."""
    from afd.comm.dispatch import expert_split, get_transport

    return get_transport(
        spec.comm_backend,
        spec.expert_ranks,
        expert_split(model_config.n_routed_experts, spec.num_expert_workers),
        device,
        rank=spec.rank,
        shm_dir=generation_dir(spec.shm_dir, generation),
        hidden_size=model_config.hidden_size,
        top_k=model_config.num_experts_per_tok,
        dispatch_dtype=spec.dispatch_dtype,
        combine_group=afd_dist.get_combine_group(),
    )


class RoleWorker:
    """What a role plugs into `serve`: weights and state loaded once, a data plane per
    generation, and one step per plan."""

    role = "abstract"
    param_bytes = 0

    def join(self, spec: WorkerSpec, generation: int) -> None:
        """Build this generation's data plane (the world is already formed)."""

    def leave(self) -> None:
        """Drop the data plane of the current generation; keep weights and KV caches."""

    def run(self, plan: Plan) -> tuple[type[WorkerMessage], dict]:
        """Run one plan; (its result's record type, the result's fields but the step)."""
        raise NotImplementedError


def serve(raw_spec: bytes, role: str, build: Callable[[WorkerSpec], RoleWorker]) -> None:
    """A worker process's life: load (build), say ready, then serve plans. The driver forms the
    data plane with `reform` (at start-up and after every failure), ends a step early with
    `abort`, and stops the worker with `shutdown`. A step that fails (a peer died, or a bug)
    is reported and the worker waits for the driver's re-form; only start-up failures and
    errors outside a step end the process. `raw_spec`: the encoded WorkerSpec."""
    import torch

    spec = wire.decode_spec(raw_spec)
    channel = WorkerChannel(spec, role)
    worker: RoleWorker | None = None
    joined = False

    def leave() -> None:
        nonlocal joined
        if worker is not None:
            worker.leave()
        liveness.set_breaker(None)  # (after a break in progress)
        afd_dist.destroy_world()
        joined = False

    try:
        torch.set_num_threads(spec.threads)
        worker = build(spec)
        channel.send(Ready, role=role, param_bytes=worker.param_bytes, pid=os.getpid())
        liveness.set_interrupt(channel.driver_message)
        liveness.start()
        while True:
            msg = channel.recv()
            if isinstance(msg, Shutdown):
                break
            if isinstance(msg, Abort):
                leave()
                channel.gen = msg.gen
                channel.send(Aborted)
                continue
            if isinstance(msg, Reform):
                leave()
                channel.gen = msg.gen
                try:
                    with liveness.bounded(spec.dist_timeout_s):
                        init_world(spec, msg.gen)
                    liveness.set_breaker(afd_dist.break_waits)
                    joined = True
                    worker.join(spec, msg.gen)
                except Exception as e:  # e.g. a peer died during the rendezvous: try again
                    leave()
                    channel.send(ReformFailed, message=f"{type(e).__name__}: {e}"[:2000])
                    continue
                channel.send(Joined)
                continue
            if not joined:
                continue  # a plan of a generation this worker has left
            try:
                result_type, fields = worker.run(msg)
            except liveness.StepAborted:
                continue  # the driver's message is handled next
            except Exception as e:
                text = f"{type(e).__name__}: {e}"
                print(f"afd: {role} worker {channel.rank}: step {msg.step} failed: "
                      f"{text}", file=sys.stderr, flush=True)  # fmt: skip
                leave()
                channel.send(StepFailed, step=msg.step, message=text[:2000])
                continue
            channel.send(result_type, step=msg.step, **fields)
    except BaseException as e:  # report anything, then die: the supervisor replaces us
        channel.report_error(e)
        raise SystemExit(1) from None
    finally:
        liveness.set_interrupt(None)
        try:
            leave()
        finally:
            channel.close()

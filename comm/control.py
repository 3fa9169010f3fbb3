"""Control plane between the driver (scheduler) and workers: ZMQ PUSH/PULL over IPC, msgpack."""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import zmq
from afd.comm import wire


def ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="afd-ipc-")


def worker_inbox(base: str, role: str, rank: int) -> str:
    return f"ipc://{os.path.join(base, f'{role}-{rank}')}"


def driver_inbox(base: str) -> str:
    return f"ipc://{os.path.join(base, 'driver')}"


class WorkerChannel:
    """A worker's two sockets: plans in from the driver, results out to it."""

    def __init__(self, base: str, role: str, rank: int):
        self.role, self.rank = role, rank
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(worker_inbox(base, role, rank))
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(driver_inbox(base))

    def recv(self) -> dict:
        return wire.decode(self.inbox.recv())

    def send(self, msg_type: str, **fields) -> None:
        self.outbox.send(wire.encode(msg_type, rank=self.rank, **fields))

    def report_error(self, exc: BaseException) -> None:
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            self.send("error", role=self.role, message=text)
        except Exception:
            pass

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close()
        self.ctx.term()


def init_world(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float = 120.0
) -> None:
    """Join the cluster's torch.distributed world over a TCP store rendezvous."""
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def dist_backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"

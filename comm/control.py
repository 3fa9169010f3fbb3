"""Control plane between the driver (scheduler) and workers: ZMQ PUSH/PULL over IPC, msgpack."""

from __future__ import annotations

import tempfile
import traceback

import zmq
from afd.comm import dist as afd_dist
from afd.comm import wire


def ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="afd-ipc-")


class WorkerChannel:
    """A worker's two sockets: plans in from the driver, results out to it."""

    def __init__(self, spec: dict, role: str):
        self.role, self.rank = role, spec["rank"]
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(spec["inbox_addrs"][self.rank])
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(spec["driver_addr"])

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


def init_world(spec: dict, timeout_s: float = 300.0) -> None:
    """Join the cluster's torch.distributed world over a TCP store rendezvous at init_addr."""
    host, _, port = spec["init_addr"].rpartition(":")
    afd_dist.init_world(
        spec["rank"], spec["world_size"], host, int(port), "auto", spec["device"], timeout_s
    )


def dist_backend(device: str) -> str:
    return afd_dist.resolve_backend("auto", device)

"""Control plane between the driver (scheduler) and workers: ZMQ PUSH/PULL over IPC, msgpack."""

from __future__ import annotations

import os
import tempfile
import traceback

import zmq
from afd.comm import dist as afd_dist
from afd.comm import wire


def ipc_dir() -> str:
    return tempfile.mkdtemp(prefix="afd-ipc-")


def shm_dir() -> str:
    """A folder for the shm transport's segments: in /dev/shm (RAM) where there is one."""
    ram = "/dev/shm"
    folder = ram if os.path.isdir(ram) and os.access(ram, os.W_OK) else None
    return tempfile.mkdtemp(prefix="afd-shm-", dir=folder)


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
    # gloo when workers share a GPU (NCCL allows no two ranks on one GPU)
    backend = afd_dist.resolve_backend(spec.get("dist_backend", "auto"), spec["device"])
    afd_dist.init_world(
        spec["rank"], spec["world_size"], host, int(port), backend, spec["device"], timeout_s,
        combine_group=backend == "nccl",
    )  # fmt: skip


def transport_for(spec: dict, model_config, device):
    """The dispatch/combine transport a worker of this cluster uses (spec from worker_spec)."""
    from afd.comm.dispatch import get_transport

    from afd.models import expert_split

    return get_transport(
        spec["comm_backend"],
        spec["expert_ranks"],
        expert_split(model_config.n_routed_experts, spec["num_expert_workers"]),
        device,
        rank=spec["rank"],
        shm_dir=spec.get("shm_dir"),
        hidden_size=model_config.hidden_size,
        top_k=model_config.num_experts_per_tok,
        dispatch_dtype=spec.get("dispatch_dtype", "auto"),
        combine_group=afd_dist.get_combine_group(),
    )

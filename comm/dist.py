"""The cluster's torch.distributed world: one process group over a TCP store rendezvous
(gloo on CPU, NCCL on GPU), sub-groups, and teardown."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")
BREAK_TAG = 1 << 30  # above every data-plane tag (afd.comm.dispatch, KV handoff)
BREAK_WAIT = timedelta(milliseconds=1)
_combine_group = None  # see init_world(combine_group=True)
_break_works: list = []  # break_waits' requests, alive until the world is destroyed


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """'auto' -> nccl for CUDA devices, gloo otherwise; checks the name and NCCL's presence."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown dist backend {backend!r}; choose from {', '.join(BACKENDS)}")
    is_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        backend = "nccl" if is_cuda else "gloo"
    if backend == "nccl":
        if not is_cuda:
            raise ValueError("the nccl backend needs a CUDA device")
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL; use backend 'gloo'")
    return backend


def init_world(
    rank: int,
    world_size: int,
    master_addr: str | None = None,
    master_port: int | None = None,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    timeout_s: float = 300.0,
    combine_group: bool = False,
    store=None,
) -> str:
    """Join the world at tcp://master_addr:master_port (rank 0 hosts the store), or over a
    given `store` (the cluster driver hosts one that outlives any worker); returns the
    backend used. Raises after `timeout_s` if some rank never shows up. combine_group=True (on
    every rank) also makes a second group over all ranks for the F->A direction: NCCL runs a
    pair's point-to-point messages on one stream in posting order, so without it a posted
    combine receive would hold back the next micro-batch's dispatch."""
    backend = resolve_backend(backend, device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    where = (
        {"store": store}
        if store is not None
        else {"init_method": f"tcp://{master_addr}:{int(master_port)}"}
    )
    dist.init_process_group(
        backend=backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **where,
    )
    global _combine_group
    _combine_group = new_group(None, timeout_s) if combine_group else None
    return backend


def get_combine_group():
    """The second group made by init_world(combine_group=True), else None."""
    return _combine_group


def new_group(ranks: list[int] | None = None, timeout_s: float | None = None):
    """A sub-group of the world (None = all ranks). Collective: EVERY rank of the world must call
    it, with the same arguments and in the same order, members or not."""
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    return dist.new_group(ranks=sorted(ranks) if ranks is not None else None, timeout=timeout)


def role_groups(role_ranks: dict[str, list[int]]) -> dict[str, object]:
    """One sub-group per role (e.g. {"attention": [0, 1], "expert": [2, 3]}), created in sorted
    role order so every rank builds them identically. Collective, like new_group."""
    return {role: new_group(role_ranks[role]) for role in sorted(role_ranks)}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def break_waits() -> None:
    """End, from any thread, every wait on this rank's gloo requests of the world (see
    afd.comm.liveness): a receive that times out closes its pair and fails every request
    pending on it, also one whose peer is stopped. The world is unusable afterwards. No-op on
    NCCL, whose wait() does not block."""
    if not is_initialized() or dist.get_backend() != "gloo":
        return
    me = dist.get_rank()
    for peer in range(dist.get_world_size()):
        if peer != me:
            _break_works.append(dist.irecv(torch.empty(1), peer, tag=BREAK_TAG))
    for work in _break_works:
        try:
            work.wait(timeout=BREAK_WAIT)
        except RuntimeError:
            pass  # the timeout that closes the pair


def destroy_world() -> None:
    """Leave the world (idempotent)."""
    global _combine_group
    _combine_group = None
    _break_works.clear()
    if is_initialized():
        dist.destroy_process_group()

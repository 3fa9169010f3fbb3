"""KV handoff from a prefill worker to an attention worker: all layers' blocks of one sequence
in one message over torch.distributed (gloo on CPU, NCCL on GPU; CUDA caches staged through host
memory when workers share a GPU and the world runs over gloo, which moves CPU tensors only)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from afd.comm import liveness

KV_TAG_BASE = 1 << 24


def kv_tag(seq_id: int) -> int:
    return KV_TAG_BASE + seq_id % (1 << 20)


def _flat(kv_caches: list) -> list[torch.Tensor]:
    return [c for layer in kv_caches for c in (layer if isinstance(layer, tuple) else (layer,))]


def _wire_device(cache: torch.Tensor) -> torch.device:
    staged = cache.is_cuda and dist.get_backend() == "gloo"
    return torch.device("cpu") if staged else cache.device


def send_kv(kv_caches: list, blocks: list[int], dst: int, seq_id: int):
    """Post the send of `blocks` of every layer's cache; returns (work, buffer) to keep alive."""
    caches = _flat(kv_caches)
    idx = torch.tensor(blocks, dtype=torch.int64, device=caches[0].device)
    buf = torch.stack([c[idx] for c in caches]).contiguous()  # [L * tensors, n, bs, ...]
    buf = buf.to(_wire_device(caches[0]))
    return dist.isend(buf, dst, tag=kv_tag(seq_id)), buf


def recv_kv(kv_caches: list, blocks: list[int], src: int, seq_id: int) -> None:
    """Receive a sequence's blocks into `blocks` of every layer's cache."""
    caches = _flat(kv_caches)
    buf = torch.empty(len(caches), len(blocks), *caches[0].shape[1:], dtype=caches[0].dtype,
                      device=_wire_device(caches[0]))  # fmt: skip
    liveness.wait_work(dist.irecv(buf, src, tag=kv_tag(seq_id)))
    buf = buf.to(caches[0].device)
    idx = torch.tensor(blocks, dtype=torch.int64, device=caches[0].device)
    for c, part in zip(caches, buf, strict=True):
        c[idx] = part

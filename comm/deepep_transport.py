"""Dispatch/combine over DeepEP's low-latency kernels (GPU, NVSHMEM/IBGDA).

UNTESTED: written against DeepEP's documented Python API (deep_ep.Buffer.low_latency_dispatch /
low_latency_combine) without a GPU or DeepEP build to run it. The torch transport is the tested
path; use it unless you have verified this one on your hardware.

How M-to-N maps onto DeepEP's all-to-all: one group holds every attention and expert rank. Each
group rank owns S virtual expert slots (S = the largest shard); expert rank r's shard [start, end)
sits in slots r*S .. r*S + (end - start); attention ranks own slots nobody routes to. Expert
ranks dispatch zero tokens and attention ranks combine zero expert rows, so every rank issues
the same sequence of kernels, which DeepEP requires.

FP8 dispatch (dispatch_dtype="fp8") is DeepEP's own `use_fp8`: it quantizes the bf16 rows to
e4m3 with a float32 scale per 128 channels on the wire, and this side dequantizes what arrives.

Limits (DeepEP's, see DESIGN.md): bf16 [T, H] activations, H from DeepEP's supported list,
T <= max_tokens_per_rank, every group rank takes part in every exchange (so all attention ranks
must join every step), and the low-latency buffers alternate per call, so all ranks must issue
dispatch/combine in lock-step: one exchange in flight (m = 1). Ping-pong (m = 2) needs the
return_recv_hook reordering on the expert side, which is not implemented here.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from afd.comm.dispatch import (
    DispatchHandle,
    ExpertBatch,
    Transport,
    fp8_groups,
    unpack_rows,
)

INSTALL_HINT = (
    "the deepep comm backend needs DeepEP (build deepseek-ai/DeepEP from source with NVSHMEM on "
    "a CUDA machine; the PyPI 'deep-ep' package is not it) or use --comm-backend torch"
)


def _import_deep_ep():
    try:
        import deep_ep
    except ImportError as e:
        raise RuntimeError(INSTALL_HINT) from e
    return deep_ep


class DeepEPTransport(Transport):
    """DeepEP low-latency dispatch/combine; UNTESTED (see module doc)."""

    name = "deepep"

    def __init__(
        self,
        expert_ranks: list[int],
        expert_ranges: list[tuple[int, int]],
        device: str | torch.device,
        group=None,
        hidden_size: int | None = None,
        top_k: int | None = None,
        max_tokens_per_rank: int = 128,
        dispatch_dtype: str = "auto",
        **_ignored,
    ):
        super().__init__(expert_ranks, expert_ranges, device, dispatch_dtype)
        if self.device.type != "cuda":
            raise ValueError("the deepep comm backend needs a CUDA device")
        if hidden_size is None or top_k is None:
            raise ValueError("the deepep comm backend needs hidden_size and top_k")
        deep_ep = _import_deep_ep()
        self.group = group if group is not None else dist.group.WORLD
        self.hidden, self.top_k, self.max_tokens = hidden_size, top_k, max_tokens_per_rank
        group_size = dist.get_world_size(self.group)
        group_rank = {r: dist.get_group_rank(self.group, r) for r in expert_ranks}
        self.slots_per_rank = max(end - start for start, end in self.expert_ranges)
        self.num_slots = self.slots_per_rank * group_size
        slot_of_expert = torch.empty(self.num_experts, dtype=torch.int64)
        for rank, (start, end) in zip(expert_ranks, self.expert_ranges, strict=True):
            base = group_rank[rank] * self.slots_per_rank
            slot_of_expert[start:end] = torch.arange(base, base + end - start)
        self.slot_of_expert = slot_of_expert.to(self.device)  # [E]
        me = dist.get_rank()
        self.own_range = (
            self.expert_ranges[expert_ranks.index(me)] if me in expert_ranks else (0, 0)
        )
        rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(
            self.max_tokens, self.hidden, group_size, self.num_slots
        )
        # collective over the group: every member constructs the transport at the same point
        self.buffer = deep_ep.Buffer(
            self.group,
            num_rdma_bytes=rdma_bytes,
            low_latency_mode=True,
            num_qps_per_rank=self.slots_per_rank,
        )
        self._in_flight = 0
        self._combine_input = torch.zeros(
            self.slots_per_rank,
            self.max_tokens * group_size,
            self.hidden,
            dtype=torch.bfloat16,
            device=self.device,
        )  # [S, max_tokens * G, H]: an attention rank's (empty) expert output

    def _begin(self) -> None:
        if self._in_flight:
            raise RuntimeError(
                "the deepep transport keeps all ranks in lock-step: combine (or send_back) the "
                "previous exchange first (micro-batches > 1 need --comm-backend torch)"
            )
        self._in_flight = 1

    def _low_latency_dispatch(self, x: torch.Tensor, slot_ids: torch.Tensor):
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"{x.shape[0]} tokens > max_tokens_per_rank {self.max_tokens}")
        recv_x, recv_count, handle, _event, _hook = self.buffer.low_latency_dispatch(
            x, slot_ids, self.max_tokens, self.num_slots, use_fp8=self.dispatch_dtype == "fp8"
        )
        return recv_x, recv_count, handle  # fp8: recv_x = (e4m3 [S, M, H], scales [S, M, H/128])

    # ---- attention side -------------------------------------------------------------------
    def dispatch(self, x, topk_ids, topk_weights, tag: int) -> DispatchHandle:
        self._begin()
        slot_ids = self.slot_of_expert[topk_ids.clamp(min=0)]
        slot_ids = torch.where(topk_ids >= 0, slot_ids, -1)  # [T, k]
        x16 = x.to(torch.bfloat16).contiguous()
        _, _, ll_handle = self._low_latency_dispatch(x16, slot_ids)
        handle = DispatchHandle(tag, x.shape[0], x.shape[1], x.dtype, [], [])
        handle.state = (ll_handle, slot_ids, topk_weights.float().contiguous())
        # payload once per row, before DeepEP's fan-out
        h = x.shape[1]
        row = h + 4 * fp8_groups(h) if self.dispatch_dtype == "fp8" else 2 * h
        handle.bytes_sent = x.shape[0] * row
        return handle

    def _waited(self, t0: int) -> None:
        # DeepEP's kernels wait and transfer in one: all of it counts as waiting for the peer
        torch.cuda.current_stream(self.device).synchronize()
        self.wait_ns += time.monotonic_ns() - t0

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        ll_handle, slot_ids, weights = handle.state
        t0 = time.monotonic_ns()
        combined, _event, _hook = self.buffer.low_latency_combine(
            self._combine_input, slot_ids, weights, ll_handle
        )
        self._waited(t0)
        self._in_flight = 0
        return combined.to(handle.dtype)  # [T, H], weights applied by DeepEP

    # ---- expert side ----------------------------------------------------------------------
    def receive(self, sources: list[int], tag: int) -> ExpertBatch:
        self._begin()
        empty_x = torch.empty(0, self.hidden, dtype=torch.bfloat16, device=self.device)
        empty_ids = torch.empty(0, self.top_k, dtype=torch.int64, device=self.device)
        t0 = time.monotonic_ns()
        recv_x, recv_count, ll_handle = self._low_latency_dispatch(empty_x, empty_ids)
        self._waited(t0)
        counts = recv_count.tolist()[: self.own_range[1] - self.own_range[0]]
        fp8 = isinstance(recv_x, tuple)
        packed = recv_x[0] if fp8 else recv_x
        xs, ids = [], []
        for slot, n in enumerate(counts):
            if fp8:  # dequantized on this side, to the bf16 DeepEP computes in
                xs.append(unpack_rows(recv_x[0][slot, :n], recv_x[1][slot, :n], torch.bfloat16))
            else:
                xs.append(recv_x[slot, :n])
            ids.append(torch.full((n, 1), slot, dtype=torch.int64, device=self.device))
        x = torch.cat(xs) if xs else empty_x
        local = torch.cat(ids) if ids else empty_ids[:, :1]
        # k = 1 and weight 1: fused_moe returns unweighted expert outputs; DeepEP's combine
        # applies the routing weights on the attention side
        weights = torch.ones(x.shape[0], 1, dtype=torch.float32, device=self.device)
        batch = ExpertBatch(tag, x, local, weights, counts, list(sources))
        batch.state = (ll_handle, packed.shape)
        return batch

    def send_back(self, batch: ExpertBatch, out: torch.Tensor, tag: int | None = None) -> None:
        ll_handle, packed_shape = batch.state
        packed = torch.zeros(packed_shape, dtype=torch.bfloat16, device=self.device)
        offset = 0
        for slot, n in enumerate(batch.counts):  # per local expert here, not per source
            packed[slot, :n] = out[offset : offset + n].to(torch.bfloat16)
            offset += n
        empty_ids = torch.empty(0, self.top_k, dtype=torch.int64, device=self.device)
        empty_w = torch.empty(0, self.top_k, dtype=torch.float32, device=self.device)
        self.buffer.low_latency_combine(packed, empty_ids, empty_w, ll_handle)
        self._in_flight = 0

    def flush(self) -> None:
        # low_latency_combine returns only once the GPU stream has the sends queued in order
        torch.cuda.current_stream(self.device).synchronize()

"""Dispatch/combine over torch.distributed point-to-point (gloo on CPU, NCCL on GPU).

Wire format per (attention rank a, expert rank f, exchange tag t):
    a -> f, wire tag 2t:     header int64 [5] = (rows, hidden, top_k, dtype code, scale groups G)
                             then, if rows > 0: x [rows, H] (x's dtype; uint8 e4m3 bytes when
                             G > 0, the FP8 dispatch), meta int32 [rows, 2k + G] =
                             (local expert ids | float32 weight bits | float32 scale bits)
    f -> a, wire tag 2t + 1: partial sums [rows, H] (x's dtype), if rows > 0

Matching: gloo matches by (peer, tag), so any interleaving of exchanges is safe there. NCCL
ignores tags and matches point-to-point messages between a pair of ranks in posting order, so
this transport keeps a strict order: both sides post a->f messages in (layer, micro-batch)
order (dispatch vs receive) and f->a messages in the same order (dispatch's combine receives vs
send_back). Expert ranks must therefore process exchanges in the order attention ranks dispatch
them, which the step plan fixes. On NCCL the workers pass a separate `combine_group` (made by
afd.comm.dist.init_world(combine_group=True)): otherwise the combine receive of micro-batch i sits
in front of the dispatch of micro-batch i + 1 on the pair's one NCCL stream and the ping-pong
overlap is lost.

CUDA tensors over a gloo world (several workers sharing one GPU, where NCCL cannot run) are
staged through host memory: gloo moves CPU tensors only.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from afd.comm import liveness
from afd.comm.dispatch import (
    CODE_DTYPES,
    DTYPE_CODES,
    DispatchHandle,
    ExpertBatch,
    Transport,
    fp8_groups,
    local_ids,
    pack_rows,
    unpack_rows,
)

HEADER_LEN = 5


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TorchTransport(Transport):
    """isend/irecv with a small size header per destination; see the module doc for ordering."""

    name = "torch"

    def __init__(
        self,
        expert_ranks: list[int],
        expert_ranges: list[tuple[int, int]],
        device: str | torch.device,
        group=None,
        combine_group=None,
        dispatch_dtype: str = "auto",
        **_ignored,
    ):
        super().__init__(expert_ranks, expert_ranges, device, dispatch_dtype)
        self.group = group
        self.combine_group = combine_group if combine_group is not None else group
        self._pending_sends: list[tuple[object, torch.Tensor]] = []
        staged = (
            self.device.type == "cuda"
            and dist.is_initialized()
            and dist.get_backend(self.group) == "gloo"
        )
        self.wire_device = torch.device("cpu") if staged else self.device

    # ---- attention side -------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,  # [T, H]
        topk_ids: torch.Tensor,  # [T, k] global expert ids
        topk_weights: torch.Tensor,  # [T, k]
        tag: int,
    ) -> DispatchHandle:
        if x.dtype not in DTYPE_CODES or not x.dtype.is_floating_point:
            raise TypeError(f"dispatch of {x.dtype} hidden states is not supported")
        num_tokens, hidden = x.shape
        top_k = topk_ids.shape[1]
        handle = DispatchHandle(tag, num_tokens, hidden, x.dtype, [], [])
        wire = self.wire_device
        ids = topk_ids.to(self.device, torch.int64)
        payload, scales = pack_rows(x.to(self.device), self.dispatch_dtype)  # [T, H], [T, G]
        rest = [topk_weights.to(self.device, torch.float32).contiguous().view(torch.int32)]
        if scales is not None:
            rest.append(scales.view(torch.int32))
            payload = payload.view(torch.uint8)  # gloo and NCCL move bytes, not e4m3
        rest = torch.cat(rest, dim=1)  # [T, k + G] int32
        groups = 0 if scales is None else scales.shape[1]
        for dst, (start, end) in zip(self.expert_ranks, self.expert_ranges, strict=True):
            local = local_ids(ids, start, end)  # [T, k]
            rows = (local >= 0).any(dim=1).nonzero().flatten()  # each token crosses once
            n = int(rows.numel())
            header = torch.tensor(
                [n, hidden, top_k, DTYPE_CODES[x.dtype], groups], dtype=torch.int64, device=wire
            )
            sends = [header]
            out = torch.empty(n, hidden, dtype=x.dtype, device=wire)
            if n:
                meta = torch.cat([local[rows].to(torch.int32), rest[rows]], dim=1)  # [n, 2k + G]
                sends += [payload[rows].to(wire), meta.to(wire)]  # [n, H], [n, 2k + G]
            for buf in sends:
                handle.works.append(dist.isend(buf, dst, group=self.group, tag=2 * tag))
                handle.bytes_sent += _nbytes(buf)
            if n:
                recv = dist.irecv(out, dst, group=self.combine_group, tag=2 * tag + 1)
                handle.works.append(recv)
            handle.keep.extend(sends)
            handle.rows.append(rows)
            handle.outs.append(out)
            self.stats["rows_sent"] += n
        self.stats["bytes_sent"] += handle.bytes_sent
        return handle

    def _wait(self, works: list) -> None:
        """Wait for `works`, counted as waiting for the peer (wait_ns); on CUDA also for the
        device, where work.wait() only orders the streams."""
        t0 = time.monotonic_ns()
        for work in works:
            liveness.wait_work(work)  # abandoned when the driver aborts the step
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.wait_ns += time.monotonic_ns() - t0

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        # gloo and NCCL move the partial sums in the background: their wire time cannot be told
        # apart from waiting for the expert side, so all of it counts as waiting
        self._wait(handle.works)
        handle.works.clear()
        handle.keep.clear()
        # fixed order (expert ranks ascending) and a float32 sum for 16-bit inputs: deterministic
        acc_dtype = torch.float32 if handle.dtype in (torch.bfloat16, torch.float16) else None
        acc = torch.zeros(
            handle.num_tokens, handle.hidden, dtype=acc_dtype or handle.dtype, device=self.device
        )
        for rows, part in zip(handle.rows, handle.outs, strict=True):
            if rows.numel():
                acc.index_add_(0, rows, part.to(self.device, acc.dtype))
                self.stats["bytes_received"] += _nbytes(part)
        return acc.to(handle.dtype)

    # ---- expert side ----------------------------------------------------------------------
    def receive(self, sources: list[int], tag: int) -> ExpertBatch:
        wire = self.wire_device
        headers = [torch.empty(HEADER_LEN, dtype=torch.int64, device=wire) for _ in sources]
        works = [
            dist.irecv(hd, src, group=self.group, tag=2 * tag)
            for hd, src in zip(headers, sources, strict=True)
        ]
        # the headers come first: waiting for them is waiting for the attention side; the rows
        # behind them are already on their way, so their wait counts as transfer
        self._wait(works)
        shapes = [tuple(int(v) for v in hd.tolist()) for hd in headers]
        if shapes:
            _, hidden, top_k, code, groups = shapes[0]
        else:
            hidden, top_k, code, groups = 0, 0, DTYPE_CODES[torch.float32], 0
        for src, (n, h, k, c, g) in zip(sources, shapes, strict=True):
            if (
                n < 0
                or (h, k, c, g) != (hidden, top_k, code, groups)
                or c not in CODE_DTYPES
                or g not in (0, fp8_groups(h))
            ):
                raise RuntimeError(
                    f"exchange {tag}: rank {src} sent header {(n, h, k, c, g)}, "
                    f"expected (rows >= 0, {hidden}, {top_k}, {code}, {groups})"
                )
        dtype = CODE_DTYPES[code]
        payload_dtype = torch.uint8 if groups else dtype
        counts = [s[0] for s in shapes]
        xs, metas, works = [], [], []
        for src, n in zip(sources, counts, strict=True):
            if n == 0:
                continue
            x = torch.empty(n, hidden, dtype=payload_dtype, device=wire)
            meta = torch.empty(n, 2 * top_k + groups, dtype=torch.int32, device=wire)
            works += [dist.irecv(buf, src, group=self.group, tag=2 * tag) for buf in (x, meta)]
            xs.append(x)
            metas.append(meta)
        for work in works:
            liveness.wait_work(work)
        if xs:
            x, meta = torch.cat(xs).to(self.device), torch.cat(metas).to(self.device)
        else:
            x = torch.empty(0, hidden, dtype=payload_dtype, device=self.device)
            meta = torch.empty(0, 2 * top_k + groups, dtype=torch.int32, device=self.device)
        received = sum(_nbytes(h) for h in headers) + _nbytes(x) + _nbytes(meta)
        if groups:
            scales = meta[:, 2 * top_k :].contiguous().view(torch.float32)  # [R, G]
            x = unpack_rows(x.view(torch.float8_e4m3fn), scales, dtype)
        ids = meta[:, :top_k].to(torch.int64)  # [R, k]
        weights = meta[:, top_k : 2 * top_k].contiguous().view(torch.float32)  # [R, k]
        self.stats["bytes_received"] += received
        return ExpertBatch(tag, x, ids, weights, counts, list(sources), received)

    def send_back(self, batch: ExpertBatch, out: torch.Tensor, tag: int | None = None) -> None:
        tag = batch.tag if tag is None else tag
        if out.shape[0] != sum(batch.counts):
            raise ValueError(f"send_back: {out.shape[0]} rows for {sum(batch.counts)} received")
        self._pending_sends = [(w, b) for w, b in self._pending_sends if not w.is_completed()]
        offset = 0
        for src, n in zip(batch.sources, batch.counts, strict=True):
            if n == 0:
                continue  # the source posted no receive for an empty share
            part = out[offset : offset + n].to(self.wire_device).contiguous()
            work = dist.isend(part, src, group=self.combine_group, tag=2 * tag + 1)
            self._pending_sends.append((work, part))
            self.stats["bytes_sent"] += _nbytes(part)
            offset += n

    def flush(self) -> None:
        for work, _ in self._pending_sends:
            liveness.wait_work(work)
        self._pending_sends.clear()

    def abandon(self) -> None:
        self._pending_sends.clear()

"""A->F dispatch and F->A combine. One interface, backends chosen by name.

Attention rank a sends each expert rank f the rows routed to any of f's experts, once per row
(not once per expert), with top-k ids of experts not on f replaced by -1. Expert ranks
return weighted partial sums for those rows; the attention rank adds them up.
Messages between a pair of ranks are matched by tag: (layer, micro-batch, direction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TRANSPORTS = ("auto", "torch", "deepep")


def message_tag(layer: int, micro_batch: int, combine: bool) -> int:
    return (layer * 64 + micro_batch) * 2 + int(combine)


@dataclass
class DispatchHandle:
    """In-flight exchange of one micro-batch: sends posted, combine receives posted."""

    num_tokens: int
    hidden: int
    dtype: torch.dtype
    rows: list[torch.Tensor]  # per expert rank: token rows sent there
    outs: list[torch.Tensor]  # per expert rank: receive buffers for partial sums
    works: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # send buffers must outlive their sends
    bytes_sent: int = 0


@dataclass
class ExpertBatch:
    """Rows received from every source for one (layer, micro-batch)."""

    x: torch.Tensor  # [R, H]
    topk_ids: torch.Tensor  # [R, k] global ids, -1 = not here
    topk_weights: torch.Tensor  # [R, k]
    counts: list[int]  # rows per source, in source order
    sources: list[int]


class TorchTransport:
    """torch.distributed point-to-point (gloo on CPU, NCCL on GPU)."""

    name = "torch"

    def __init__(self, expert_ranks: list[int], expert_ranges: list[tuple[int, int]], device):
        self.expert_ranks = expert_ranks
        self.expert_ranges = expert_ranges
        self.device = torch.device(device)
        self._pending_sends: list = []

    # ---- attention side -------------------------------------------------------------------
    def dispatch(
        self,
        x: torch.Tensor,  # [T, H]
        topk_ids: torch.Tensor,  # [T, k] global expert ids
        topk_weights: torch.Tensor,  # [T, k]
        layer: int,
        micro_batch: int,
    ) -> DispatchHandle:
        t, h = x.shape
        handle = DispatchHandle(t, h, x.dtype, [], [])
        tag, ctag = message_tag(layer, micro_batch, False), message_tag(layer, micro_batch, True)
        weights = topk_weights.float()
        for dst, (start, end) in zip(self.expert_ranks, self.expert_ranges, strict=True):
            on_dst = (topk_ids >= start) & (topk_ids < end)  # [T, k]
            rows = on_dst.any(dim=1).nonzero().flatten()  # each row crosses once
            n = int(rows.numel())
            header = torch.tensor([n], dtype=torch.int64, device=self.device)
            handle.keep.append(header)
            handle.works.append(dist.isend(header, dst, tag=tag))
            out = torch.empty(n, h, dtype=x.dtype, device=self.device)
            if n:
                local = torch.where(on_dst[rows], topk_ids[rows], -1)  # global ids
                payload = [x[rows].contiguous(), local.contiguous(), weights[rows].contiguous()]
                for buf in payload:
                    handle.works.append(dist.isend(buf, dst, tag=tag))
                    handle.bytes_sent += buf.numel() * buf.element_size()
                handle.keep.extend(payload)
                handle.works.append(dist.irecv(out, dst, tag=ctag))
            handle.rows.append(rows)
            handle.outs.append(out)
        return handle

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        """Wait for every expert rank's partial sums and add them up, in rank order."""
        for w in handle.works:
            w.wait()
        out = torch.zeros(handle.num_tokens, handle.hidden, dtype=handle.dtype, device=self.device)
        for rows, part in zip(handle.rows, handle.outs, strict=True):
            if rows.numel():
                out.index_add_(0, rows, part)
        return out

    # ---- expert side ----------------------------------------------------------------------
    def receive(
        self,
        sources: list[int],
        layer: int,
        micro_batch: int,
        hidden: int,
        top_k: int,
        dtype: torch.dtype,
    ) -> ExpertBatch:
        tag = message_tag(layer, micro_batch, False)
        headers = [torch.empty(1, dtype=torch.int64, device=self.device) for _ in sources]
        for w in [dist.irecv(hd, src, tag=tag) for hd, src in zip(headers, sources, strict=True)]:
            w.wait()
        counts = [int(hd.item()) for hd in headers]
        xs, ids, ws, works = [], [], [], []
        for src, n in zip(sources, counts, strict=True):
            if n == 0:
                continue
            bufs = (
                torch.empty(n, hidden, dtype=dtype, device=self.device),
                torch.empty(n, top_k, dtype=torch.int64, device=self.device),
                torch.empty(n, top_k, dtype=torch.float32, device=self.device),
            )
            works += [dist.irecv(b, src, tag=tag) for b in bufs]
            xs.append(bufs[0])
            ids.append(bufs[1])
            ws.append(bufs[2])
        for w in works:
            w.wait()
        if xs:
            x, i, w = torch.cat(xs), torch.cat(ids), torch.cat(ws)
        else:
            x = torch.empty(0, hidden, dtype=dtype, device=self.device)
            i = torch.empty(0, top_k, dtype=torch.int64, device=self.device)
            w = torch.empty(0, top_k, dtype=torch.float32, device=self.device)
        return ExpertBatch(x, i, w, counts, sources)

    def send_back(
        self, batch: ExpertBatch, out: torch.Tensor, layer: int, micro_batch: int
    ) -> None:
        """Return each source its rows of the partial sums (non-blocking)."""
        tag = message_tag(layer, micro_batch, True)
        offset = 0
        for src, n in zip(batch.sources, batch.counts, strict=True):
            if n:
                part = out[offset : offset + n].contiguous()
                self._pending_sends.append((dist.isend(part, src, tag=tag), part))
                offset += n
        self._pending_sends = [(w, b) for w, b in self._pending_sends if not w.is_completed()]

    def flush(self) -> None:
        for w, _ in self._pending_sends:
            w.wait()
        self._pending_sends.clear()


def get_transport(name: str, expert_ranks, expert_ranges, device):
    """Pick a transport by name; 'auto' is DeepEP on CUDA when installed, else torch."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown comm backend {name!r}; choose from {', '.join(TRANSPORTS)}")
    if name == "deepep" or (name == "auto" and str(device).startswith("cuda") and _has_deep_ep()):
        if not str(device).startswith("cuda"):
            raise ValueError("--comm-backend deepep needs --device cuda")
        if not _has_deep_ep():
            raise RuntimeError(
                "--comm-backend deepep needs the deep_ep package (build DeepEP from source, see "
                "README 'GPU extras')"
            )
        raise NotImplementedError(
            "the DeepEP transport is not implemented yet; use --comm-backend torch (NCCL on GPU)"
        )
    return TorchTransport(expert_ranks, expert_ranges, device)


def _has_deep_ep() -> bool:
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return False
    return True

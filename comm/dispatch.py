"""A->F dispatch and F->A combine: one interface, transports chosen by name from a registry.

Attention side, per (layer, micro-batch):
    handle = transport.dispatch(x [T, H], topk_ids [T, k] global, topk_weights [T, k], tag)
    ...                                   # attention of the next micro-batch runs meanwhile
    routed = transport.combine(handle)    # [T, H], sum of every expert rank's partial sums
Expert side, in the same (layer, micro-batch) order:
    batch = transport.receive(sources, tag)   # rows from every source, ids local to this shard
    out = fused_moe(batch.x, w13, w2, batch.topk_weights, batch.topk_ids)
    transport.send_back(batch, out)           # non-blocking; flush() before tearing down

A token crosses the wire once per destination expert rank (not once per expert); its k ids are
rewritten to that rank's local expert ids, -1 where the expert lives elsewhere. A rank with no
rows for a destination still sends a header with a zero count, so every exchange completes.

`tag` names one exchange (see exchange_tag); a transport may derive several wire tags from it.

`dispatch_dtype="fp8"` sends x as e4m3 plus one float32 scale per token and 128 channels
(DeepEP's low-latency format; pack_rows), and the expert side dequantizes it back to the compute
dtype named on the wire (unpack_rows); combine always travels in the compute dtype.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from afd.choices import DISPATCH_DTYPES  # noqa: F401  (re-exported; one list)

MAX_MICRO_BATCHES = 64
FP8_GROUP = 128  # channels per scale of an FP8 payload
# KV handoffs use tags from 2^24 (docs/structures.md); exchange tags x2 + direction stay below.
MAX_EXCHANGE_TAG = 2**23


# dtype <-> int code in transport headers (the same numbers on every transport)
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.float8_e4m3fn: 6,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def exchange_tag(layer: int, micro_batch: int) -> int:
    """The tag of one (layer, micro-batch) exchange; wire tags are tag * 2 + direction."""
    if not 0 <= micro_batch < MAX_MICRO_BATCHES:
        raise ValueError(f"micro_batch {micro_batch} outside [0, {MAX_MICRO_BATCHES})")
    tag = layer * MAX_MICRO_BATCHES + micro_batch
    if not 0 <= tag < MAX_EXCHANGE_TAG:
        raise ValueError(f"layer {layer} gives tag {tag} outside [0, {MAX_EXCHANGE_TAG})")
    return tag


def pack_rows(x: torch.Tensor, dispatch_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, H] -> (payload, scales): x itself and None, or for "fp8" e4m3 [T, H] and float32
    [T, ceil(H/128)] (quantized per token, so any subset of rows can be sent alone)."""
    if dispatch_dtype == "auto":
        return x, None
    if dispatch_dtype != "fp8":
        raise ValueError(
            f"unknown dispatch dtype {dispatch_dtype!r}; choose from {', '.join(DISPATCH_DTYPES)}"
        )
    from afd.kernels import ops

    return ops.quant_fp8(x, FP8_GROUP)


def unpack_rows(
    payload: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of pack_rows: the rows in `dtype` (a copy when they were FP8)."""
    if scales is None:
        return payload
    from afd.kernels.torch_ops import dequant_fp8

    return dequant_fp8(payload, scales, (1, FP8_GROUP), dtype)


def fp8_groups(hidden: int) -> int:
    """Float32 scales per row of an FP8 payload."""
    return -(-hidden // FP8_GROUP)


def local_ids(topk_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Global expert ids -> ids local to the shard [start, end); -1 for experts elsewhere."""
    on_shard = (topk_ids >= start) & (topk_ids < end)
    return torch.where(on_shard, topk_ids - start, torch.full_like(topk_ids, -1))


@dataclass
class DispatchHandle:
    """One in-flight exchange on the attention side: sends and combine receives posted."""

    tag: int
    num_tokens: int
    hidden: int
    dtype: torch.dtype
    rows: list[torch.Tensor]  # per expert rank: indices of the token rows sent there
    outs: list[torch.Tensor]  # per expert rank: [rows, H] buffer for its partial sums
    works: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # send buffers must outlive their sends
    bytes_sent: int = 0
    state: object = None  # transport-private (e.g. DeepEP's handle)

    @property
    def rows_per_rank(self) -> list[int]:
        return [int(r.numel()) for r in self.rows]


@dataclass
class ExpertBatch:
    """Rows received from every source for one exchange, concatenated in source order."""

    tag: int
    x: torch.Tensor  # [R, H]
    topk_ids: torch.Tensor  # [R, k] shard-local ids, -1 = expert not on this rank
    topk_weights: torch.Tensor  # [R, k] float32
    counts: list[int]  # rows per source, in source order
    sources: list[int]
    bytes_received: int = 0
    state: object = None  # transport-private

    def global_ids(self, start: int) -> torch.Tensor:
        """topk_ids as global expert ids of a shard starting at `start` (-1 kept)."""
        return torch.where(self.topk_ids >= 0, self.topk_ids + start, self.topk_ids)


class Transport(ABC):
    """Dispatch/combine between attention ranks and expert ranks holding expert ranges.

    `wait_ns` counts the nanoseconds this side spent blocked until a peer's data was there
    (cumulative); workers read it around combine/receive to tell waiting for the other side
    from the transfer work (copies, sums) that follows."""

    name = "abstract"
    wait_ns: int = 0

    def __init__(
        self,
        expert_ranks: list[int],
        expert_ranges: list[tuple[int, int]],
        device: str | torch.device,
        dispatch_dtype: str = "auto",
    ):
        if dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(
                f"unknown dispatch dtype {dispatch_dtype!r}; "
                f"choose from {', '.join(DISPATCH_DTYPES)}"
            )
        self.dispatch_dtype = dispatch_dtype
        if len(expert_ranks) != len(expert_ranges):
            raise ValueError("one expert range per expert rank")
        prev_end = 0
        for start, end in expert_ranges:
            if start != prev_end or end < start:
                raise ValueError(f"expert ranges must be contiguous and ordered: {expert_ranges}")
            prev_end = end
        self.expert_ranks = list(expert_ranks)
        self.expert_ranges = [(int(s), int(e)) for s, e in expert_ranges]
        self.num_experts = prev_end
        self.device = torch.device(device)
        self.stats = {"bytes_sent": 0, "bytes_received": 0, "rows_sent": 0}

    # attention side
    @abstractmethod
    def dispatch(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        tag: int,
    ) -> DispatchHandle:
        """Post the sends of x's rows and the combine receives; returns without waiting."""

    @abstractmethod
    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        """Wait for every expert rank's partial sums and add them, in expert-rank order."""

    # expert side
    @abstractmethod
    def receive(self, sources: list[int], tag: int) -> ExpertBatch:
        """Block until every source's rows for `tag` arrived (a source may send zero rows)."""

    @abstractmethod
    def send_back(self, batch: ExpertBatch, out: torch.Tensor, tag: int | None = None) -> None:
        """Return each source its rows of out [R, H] without waiting."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every posted send has completed."""

    def close(self) -> None:
        self.flush()

    def abandon(self) -> None:
        """Drop in-flight exchanges without waiting for them (a peer may be gone): after a
        failed step, before the data plane is re-formed."""
        return None


# name -> "module:Class" (imported on first use, so optional backends cost nothing) or a factory
_REGISTRY: dict[str, str | Callable[..., Transport]] = {
    "torch": "afd.comm.torch_transport:TorchTransport",
    "shm": "afd.comm.shm_transport:ShmTransport",
    "deepep": "afd.comm.deepep_transport:DeepEPTransport",
}


def expert_split(num_experts: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous expert ranges per shard; the first `num_experts % num_shards` get one more."""
    base, extra = divmod(num_experts, num_shards)
    ranges, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def register_transport(name: str, factory: str | Callable[..., Transport]) -> None:
    """Add a transport: a factory(expert_ranks, expert_ranges, device, **options) or its path."""
    if name == "auto":
        raise ValueError("'auto' is reserved")
    _REGISTRY[name] = factory


def transport_names() -> list[str]:
    return ["auto", *sorted(_REGISTRY)]


def resolve_transport_name(
    name: str, device: str | torch.device, shm_dir: str | None = None, shared_gpus: bool = False
) -> str:
    """'auto' -> shm when every rank shares one host (a shared folder is given) on CPU or on
    shared GPUs (staged through host memory); else torch. Never deepep: that transport has not
    run on a GPU yet and supports one exchange in flight (m = 1), so only `deepep` asks for it."""
    kind = torch.device(device).type
    if name == "auto":
        one_host = shm_dir and "shm" in _REGISTRY
        return "shm" if one_host and (kind == "cpu" or shared_gpus) else "torch"
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown comm backend {name!r}; choose from {', '.join(transport_names())}"
        )
    if name == "deepep" and shared_gpus:
        raise ValueError("--comm-backend deepep needs one GPU per worker; drop --gpus-per-node")
    return name


def get_transport(
    name: str,
    expert_ranks: list[int],
    expert_ranges: list[tuple[int, int]],
    device: str | torch.device,
    **options,
) -> Transport:
    """Build the transport registered as `name` ('auto' picks one for the device). Options
    every worker passes: rank, shm_dir, hidden_size, top_k; a transport ignores what it does
    not use."""
    factory = _REGISTRY[resolve_transport_name(name, device, options.get("shm_dir"))]
    if isinstance(factory, str):
        module, cls = factory.split(":")
        factory = getattr(importlib.import_module(module), cls)
    return factory(expert_ranks, expert_ranges, device, **options)

"""Dispatch/combine through shared memory between ranks on one host (CPU).

Why not gloo here: gloo moves data on a background thread in each process. With one worker per
core, that thread has to preempt a busy compute thread on both ends, which costs milliseconds per
exchange and undoes the ping-pong overlap. Here the sending thread writes the rows straight into
a shared segment and a 128-byte record into a FIFO; the receiving thread reads them when it asks
for them. No helper thread runs on either side, and a receiver that waits sleeps in poll().

Per directed pair (src -> dst), in `shm_dir`:
    fifo-{src}-{dst}          records, in send order: int64 [16] =
                              (tag, slot, generation, capacity, num_tensors, aux,
                               then per tensor (dtype code, rows, cols) for up to 3 tensors)
    slot-{src}-{dst}-{slot}-{generation}
                              int64 [8] control words (0: sequence written, 1: sequence released)
                              then the tensors, each at a 64-byte aligned offset
A sender reuses a slot once its receiver released it and makes a new (or a larger) one otherwise,
so any number of exchanges may be in flight. Receivers read the rows in place (no copy) until
they release the slot: the expert side after send_back, the attention side inside combine.

Attention -> expert carries (x [n, H], meta int32 [n, 2k]) with the same layout as the torch
transport, also when n = 0; expert -> attention carries the partial sums [n, H]. With the FP8
dispatch x is e4m3 [n, H], meta [n, 2k + G] ends with the float32 scale bits, and aux names the
compute dtype to dequantize to.

On CUDA (workers sharing one GPU, where NCCL cannot run) the same segments stage the rows
through host memory: senders copy device rows into the slot, receivers copy them out to their
device. The segments are page-locked (cudaHostRegister) where CUDA allows, so those copies are
DMA transfers.
"""

from __future__ import annotations

import errno
import os
import select
import time
from dataclasses import dataclass

import torch

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

RECORD_LEN = 16  # int64 words per FIFO record (128 bytes: one atomic pipe write)
CONTROL_BYTES = 64
MAX_TENSORS = 3
WAIT_SLICE_MS = 50


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def _nbytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    return shape[0] * shape[1] * dtype.itemsize


def _map(path: str, capacity: int, create: bool) -> torch.Tensor:
    if create:
        with open(path, "wb") as f:
            f.truncate(capacity)
    return torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8)


def _views(buf: torch.Tensor, specs: list[tuple[torch.dtype, int, int]]) -> list[torch.Tensor]:
    out, offset = [], CONTROL_BYTES
    for dtype, rows, cols in specs:
        n = _nbytes((rows, cols), dtype)
        out.append(buf[offset : offset + n].view(dtype).view(rows, cols))
        offset += _align(n)
    return out


def _pin(buf: torch.Tensor) -> bool:
    """Page-lock a shared segment for fast GPU copies; False (and unpinned) where CUDA refuses."""
    try:
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
        return int(err) == 0
    except Exception:  # no CUDA runtime, or a build without the binding: plain copies still work
        return False


def _unpin(buf: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:
        pass


def _fifo(path: str) -> int:
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        pass
    # O_RDWR: opening never waits for the other end, and the pipe outlives a slow peer's open
    return os.open(path, os.O_RDWR)


@dataclass
class _Slot:
    path: str
    index: int
    generation: int
    capacity: int
    buf: torch.Tensor  # [capacity] uint8, shared
    control: torch.Tensor  # int64 [8] view of the first 64 bytes
    sequence: int = 0  # messages written into this slot so far
    pinned: bool = False

    @property
    def released(self) -> bool:
        return int(self.control[1]) == self.sequence


@dataclass
class Received:
    """One message read in place from a peer's slot; release() hands the slot back."""

    tensors: list[torch.Tensor]
    control: torch.Tensor | None
    sequence: int
    aux: int = 0

    def release(self) -> None:
        if self.control is not None:
            self.control[1] = self.sequence
            self.control = None


class _Outgoing:
    """src -> dst: slots this side writes and the FIFO it announces them on."""

    def __init__(self, folder: str, src: int, dst: int, pin: bool = False):
        self.prefix = os.path.join(folder, f"slot-{src}-{dst}")
        self.fd = _fifo(os.path.join(folder, f"fifo-{src}-{dst}"))
        self.slots: list[_Slot] = []
        self.pin = pin

    def send(self, tag: int, tensors: list[torch.Tensor | tuple], aux: int = 0) -> int:
        """tensors: filled tensors (any device), or (dtype, rows, cols, fill(view)) to write in
        place; `aux` travels in the record."""
        specs = [
            (t.dtype, t.shape[0], t.shape[1]) if isinstance(t, torch.Tensor) else t[:3]
            for t in tensors
        ]
        if len(specs) > MAX_TENSORS:
            raise ValueError(f"at most {MAX_TENSORS} tensors per message")
        need = CONTROL_BYTES + sum(_align(_nbytes((r, c), d)) for d, r, c in specs)
        slot = self._free_slot(need)
        record = [tag, slot.index, slot.generation, slot.capacity, len(specs), aux]
        for view, t, (dtype, rows, cols) in zip(
            _views(slot.buf, specs), tensors, specs, strict=True
        ):
            if isinstance(t, torch.Tensor):
                view.copy_(t)
            else:
                t[3](view)
            record += [DTYPE_CODES[dtype], rows, cols]
        record += [0] * (RECORD_LEN - len(record))
        slot.sequence += 1
        slot.control[0] = slot.sequence
        os.write(self.fd, torch.tensor(record, dtype=torch.int64).numpy().tobytes())
        return sum(_nbytes((r, c), d) for d, r, c in specs)

    def _free_slot(self, need: int) -> _Slot:
        free = [s for s in self.slots if s.released]
        for s in free:
            if s.capacity >= need:
                return s
        capacity = max(1 << 16, 1 << (need - 1).bit_length())
        if free:  # grow a free slot: a new generation replaces its file
            old = free[0]
            if old.pinned:
                _unpin(old.buf)
            os.unlink(old.path)
            index, generation = old.index, old.generation + 1
            self.slots.remove(old)
        else:
            index, generation = len(self.slots), 0
        path = f"{self.prefix}-{index}-{generation}"
        buf = _map(path, capacity, create=True)
        slot = _Slot(path, index, generation, capacity, buf, buf[:CONTROL_BYTES].view(torch.int64))
        slot.pinned = self.pin and _pin(buf)
        self.slots.append(slot)
        return slot

    def close(self, timeout_s: float) -> None:
        """Unlink the slots once the receiver has read them (or after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while not all(s.released for s in self.slots) and time.monotonic() < deadline:
            time.sleep(0.001)
        for s in self.slots:
            if s.pinned:
                _unpin(s.buf)
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
        self.slots.clear()
        os.close(self.fd)


class _Incoming:
    """src -> dst as seen by dst: the FIFO it reads and the peer's slots it maps."""

    def __init__(self, folder: str, src: int, dst: int, timeout_s: float, pin: bool = False):
        self.folder, self.src, self.dst, self.pin = folder, src, dst, pin
        self.fd = _fifo(os.path.join(folder, f"fifo-{src}-{dst}"))
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.timeout_ms = int(timeout_s * 1000)
        # slot -> (generation, buffer, pinned)
        self.mapped: dict[int, tuple[int, torch.Tensor, bool]] = {}
        self.early: dict[int, list[int]] = {}  # records that arrived before their tag was asked
        self.wait_ns = 0  # time blocked in poll(): the peer had not sent yet

    def recv(self, tag: int) -> Received:
        record = self.early.pop(tag, None)
        while record is None:
            got = self._read_record()
            if got[0] == tag:
                record = got
            elif got[0] in self.early:
                raise RuntimeError(f"rank {self.src} sent exchange {got[0]} twice")
            else:
                self.early[got[0]] = got
        _, index, generation, capacity, count, aux = record[:6]
        specs = [
            (CODE_DTYPES[record[6 + 3 * i]], record[7 + 3 * i], record[8 + 3 * i])
            for i in range(count)
        ]
        have = self.mapped.get(index)
        if have is None or have[0] != generation:
            path = os.path.join(self.folder, f"slot-{self.src}-{self.dst}-{index}-{generation}")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {self.src} removed its segment {path} before it was read")
            if have is not None and have[2]:
                _unpin(have[1])
            buf = _map(path, capacity, create=False)
            have = (generation, buf, self.pin and _pin(buf))
            self.mapped[index] = have
        buf = have[1]
        control = buf[:CONTROL_BYTES].view(torch.int64)
        return Received(_views(buf, specs), control, int(control[0]), aux)

    def _read_record(self) -> list[int]:
        size = RECORD_LEN * 8
        data = b""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while len(data) < size:
            # wait in slices: a peer that died or hangs never writes, and the driver's abort
            # must be able to end the wait (liveness.check raises StepAborted then)
            t0 = time.monotonic_ns()
            ready = self.poller.poll(WAIT_SLICE_MS)
            self.wait_ns += time.monotonic_ns() - t0
            if not ready:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no message from rank {self.src} within {self.timeout_ms / 1000:.0f} s"
                    )
                liveness.check()
                continue
            try:
                chunk = os.read(self.fd, size - len(data))
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                raise
            data += chunk
        return torch.frombuffer(bytearray(data), dtype=torch.int64).tolist()

    def close(self) -> None:
        for _, buf, pinned in self.mapped.values():
            if pinned:
                _unpin(buf)
        self.mapped.clear()
        os.close(self.fd)


class ShmTransport(Transport):
    """Shared-memory slots + FIFO records between ranks of one host; see the module doc."""

    name = "shm"

    def __init__(
        self,
        expert_ranks: list[int],
        expert_ranges: list[tuple[int, int]],
        device: str | torch.device,
        rank: int | None = None,
        shm_dir: str | None = None,
        timeout_s: float = 600.0,
        dispatch_dtype: str = "auto",
        **_ignored,
    ):
        super().__init__(expert_ranks, expert_ranges, device, dispatch_dtype)
        if rank is None or not shm_dir:
            raise ValueError("the shm comm backend needs this process's rank and a shared folder")
        self.rank, self.folder, self.timeout_s = rank, shm_dir, timeout_s
        # GPU rows travel through the segments: copied in by senders, out by receivers (the
        # same code path runs on CPU when a test sets it)
        self.staged = self.device.type != "cpu"
        self.pin = self.device.type == "cuda"
        self._out: dict[int, _Outgoing] = {}
        self._in: dict[int, _Incoming] = {}

    @property
    def wait_ns(self) -> int:
        return sum(link.wait_ns for link in self._in.values())

    def _to(self, dst: int) -> _Outgoing:
        if dst not in self._out:
            self._out[dst] = _Outgoing(self.folder, self.rank, dst, self.pin)
        return self._out[dst]

    def _from(self, src: int) -> _Incoming:
        if src not in self._in:
            self._in[src] = _Incoming(self.folder, src, self.rank, self.timeout_s, self.pin)
        return self._in[src]

    # ---- attention side -------------------------------------------------------------------
    def dispatch(self, x, topk_ids, topk_weights, tag) -> DispatchHandle:
        num_tokens, hidden = x.shape
        if x.dtype not in DTYPE_CODES or not x.dtype.is_floating_point:
            raise TypeError(f"dispatch of {x.dtype} hidden states is not supported")
        handle = DispatchHandle(tag, num_tokens, hidden, x.dtype, [], [])
        payload, scales = pack_rows(x, self.dispatch_dtype)  # [T, H] (e4m3), [T, G]
        rest = [topk_weights.to(torch.float32).contiguous().view(torch.int32)]
        if scales is not None:
            rest.append(scales.view(torch.int32))
        rest = torch.cat(rest, dim=1)  # [T, k + G]: weight bits (then scale bits)
        in_place = not self.staged
        for dst, (start, end) in zip(self.expert_ranks, self.expert_ranges, strict=True):
            local = local_ids(topk_ids, start, end)  # [T, k]
            on_rank = (local >= 0).any(dim=1)
            if bool(on_rank.all()):
                rows = torch.arange(num_tokens, device=x.device)
                parts = [payload, torch.cat([local.to(torch.int32), rest], dim=1)]
            else:
                rows = on_rank.nonzero().flatten()  # each token crosses once
                n = int(rows.numel())

                def gather(view, rows=rows):  # straight into the shared segment
                    torch.index_select(payload, 0, rows, out=view)

                parts = [
                    (payload.dtype, n, hidden, gather) if in_place else payload[rows],
                    torch.cat([local[rows].to(torch.int32), rest[rows]], dim=1),
                ]
            sent = self._to(dst).send(2 * tag, parts, aux=DTYPE_CODES[x.dtype])
            handle.rows.append(rows)
            handle.bytes_sent += sent
            self.stats["rows_sent"] += int(rows.numel())
        self.stats["bytes_sent"] += handle.bytes_sent
        return handle

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        acc_dtype = torch.float32 if handle.dtype in (torch.bfloat16, torch.float16) else None
        acc = None
        received = []
        for dst, rows in zip(self.expert_ranks, handle.rows, strict=True):
            msg = self._from(dst).recv(2 * handle.tag + 1)
            part = msg.tensors[0].to(self.device)  # [n, H]; read in place on CPU
            if part.shape[0] != rows.numel():
                raise RuntimeError(
                    f"exchange {handle.tag}: rank {dst} returned {part.shape[0]} rows "
                    f"for {rows.numel()} sent"
                )
            received.append(msg)
            self.stats["bytes_received"] += part.numel() * part.element_size()
            if part.shape[0] == 0:
                continue
            if acc is None and acc_dtype is None and part.shape[0] == handle.num_tokens:
                acc = part.clone()  # rows are 0..T-1 in order: the whole batch went there
                continue
            if acc is None:
                acc = torch.zeros(
                    handle.num_tokens, handle.hidden, dtype=acc_dtype or handle.dtype,
                    device=self.device,
                )  # fmt: skip
            acc.index_add_(0, rows, part.to(acc.dtype))
        for msg in received:
            msg.release()
        if acc is None:
            return torch.zeros(
                handle.num_tokens, handle.hidden, dtype=handle.dtype, device=self.device
            )
        return acc.to(handle.dtype)

    # ---- expert side ----------------------------------------------------------------------
    def receive(self, sources: list[int], tag: int) -> ExpertBatch:
        msgs = [self._from(src).recv(2 * tag) for src in sources]
        xs = [m.tensors[0] for m in msgs]
        metas = [m.tensors[1] for m in msgs]
        first = (xs[0].shape[1], xs[0].dtype, metas[0].shape[1], msgs[0].aux) if xs else None
        for src, x, meta, m in zip(sources, xs, metas, msgs, strict=True):
            if (x.shape[1], x.dtype, meta.shape[1], m.aux) != first:
                raise RuntimeError(f"exchange {tag}: rank {src} sent a different hidden/top_k")
        received = sum(t.numel() * t.element_size() for t in (*xs, *metas))
        if len(msgs) == 1 and not self.staged:
            x, meta = xs[0], metas[0]  # read in place until send_back releases the slot
        else:
            x = torch.cat(xs).to(self.device)
            meta = torch.cat(metas).to(self.device)
            for m in msgs:
                m.release()
            msgs = []
        if x.dtype == torch.float8_e4m3fn:
            top_k = (meta.shape[1] - fp8_groups(x.shape[1])) // 2
            scales = meta[:, 2 * top_k :].contiguous().view(torch.float32)  # [R, G]
            x = unpack_rows(x, scales, CODE_DTYPES[first[3]])  # a copy: the slot can go
            meta = meta[:, : 2 * top_k]
            for m in msgs:
                m.release()
            msgs = []
        top_k = meta.shape[1] // 2
        ids = meta[:, :top_k].to(torch.int64)  # [R, k]
        weights = meta[:, top_k:].contiguous().view(torch.float32)  # [R, k]
        self.stats["bytes_received"] += received
        counts = [int(t.shape[0]) for t in xs]
        return ExpertBatch(tag, x, ids, weights, counts, list(sources), received, state=msgs)

    def send_back(self, batch: ExpertBatch, out: torch.Tensor, tag: int | None = None) -> None:
        tag = batch.tag if tag is None else tag
        if out.shape[0] != sum(batch.counts):
            raise ValueError(f"send_back: {out.shape[0]} rows for {sum(batch.counts)} received")
        offset = 0
        for src, n in zip(batch.sources, batch.counts, strict=True):
            sent = self._to(src).send(2 * tag + 1, [out[offset : offset + n]])
            self.stats["bytes_sent"] += sent
            offset += n
        for msg in batch.state or []:
            msg.release()  # the input rows were read in place until here

    def flush(self) -> None:
        pass  # sends complete when send_back returns

    def abandon(self) -> None:
        self.close(timeout_s=0.0)

    def close(self, timeout_s: float = 10.0) -> None:
        for link in self._in.values():
            link.close()
        for link in self._out.values():
            link.close(timeout_s)
        self._out.clear()
        self._in.clear()

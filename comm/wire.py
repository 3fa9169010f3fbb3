"""Control-plane wire format: the records of `afd.comm.messages` as msgpack (msgspec), decoded
at the boundary into the record the tag names, every field checked; tensors as raw bytes with
dtype and shape. Nothing received is ever unpickled.

Any malformed, unknown or ill-typed input raises `WireError` (a ValueError), never anything
else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from afd.comm.messages import FromWorker, Record, ToSupervisor, ToWorker, WorkerSpec

if TYPE_CHECKING:
    import torch

# dtypes that travel (torch names); torch is imported only where a tensor is made, so that
# processes with no tensors (the supervisor's children) decode records without it
_DTYPES = frozenset(
    {"float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64",
     "int32", "int16", "int8", "uint8", "bool"}
)  # fmt: skip

T = TypeVar("T")


class WireError(ValueError):
    """A malformed or unknown message."""


# ---- records ------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def encode(record: Record) -> bytes:
    """A record -> msgpack bytes (its tag included)."""
    if not isinstance(record, Record):
        raise WireError(f"{type(record).__name__} is not a wire record")
    return _encoder.encode(record)


class Decoder(Generic[T]):
    """Bytes -> a record of type `kind` (a record class or a tagged union of them)."""

    def __init__(self, kind: Any):
        self._decoder = msgspec.msgpack.Decoder(kind)

    def __call__(self, raw: bytes) -> T:
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError as e:  # ValidationError included
            raise WireError(f"malformed message: {e}") from None


# the two directions of the control plane, the worker spec and the supervisor's pipe
decode_to_worker: Decoder[ToWorker] = Decoder(ToWorker)
decode_from_worker: Decoder[FromWorker] = Decoder(FromWorker)
decode_spec: Decoder[WorkerSpec] = Decoder(WorkerSpec)
decode_to_supervisor: Decoder[ToSupervisor] = Decoder(ToSupervisor)


# ---- tensors ------------------------------------------------------------------------------------


class TensorBytes(Record, frozen=True):
    """A tensor on the wire: raw little-endian bytes, its dtype name and shape."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorBytes:
        """Any device, any layout, bf16 and fp8 included (they have no numpy dtype)."""
        import torch

        t = t.detach().contiguous().cpu()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise WireError(f"dtype {name} cannot travel")
        raw = t.reshape(-1).view(torch.uint8)
        return cls(name, list(t.shape), raw.numpy().tobytes())

    def to_tensor(self) -> torch.Tensor:
        """The tensor, in its own writable memory; WireError on a bad dtype, shape or size."""
        import torch

        if self.dtype not in _DTYPES:
            raise WireError(f"malformed tensor: unknown dtype {self.dtype[:40]!r}")
        dtype = getattr(torch, self.dtype)
        if not all(s >= 0 for s in self.shape):
            raise WireError(f"malformed tensor: bad shape {str(self.shape)[:80]}")
        numel = 1
        for s in self.shape:
            numel *= s
        need = numel * torch.empty((), dtype=dtype).element_size()
        if len(self.data) != need:
            raise WireError(
                f"tensor data has {len(self.data)} bytes, shape {self.shape} needs {need}"
            )
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        flat = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return flat.view(dtype).reshape(self.shape)

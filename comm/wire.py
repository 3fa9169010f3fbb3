"""Control-plane wire format: msgpack maps with a type tag, validated on receipt; tensors as raw
bytes with dtype and shape. Nothing received is ever unpickled."""

from __future__ import annotations

from typing import Any

import msgpack
import torch

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}

# message type -> required fields and their python types
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"rank": int, "role": str, "param_bytes": int},
    "error": {"rank": int, "role": str, "message": str},
    "attn_step": {
        "step": int,
        "micro_batches": list,
        "release": list,
        "imports": list,
        "trace": bool,
    },
    "prefill_step": {"step": int, "micro_batches": list, "exports": list, "trace": bool},
    "prefill_result": {"rank": int, "step": int, "sampled": list, "times": dict, "events": list},
    "expert_step": {"step": int, "sources": list, "num_micro_batches": int, "trace": bool},
    "attn_result": {"rank": int, "step": int, "sampled": list, "times": dict, "events": list},
    "expert_result": {"rank": int, "step": int, "times": dict, "events": list, "load": list},
    "shutdown": {},
}


class WireError(ValueError):
    """A malformed or unknown message."""


def tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise WireError(f"dtype {name} cannot travel")
    raw = t.view(torch.uint8) if t.dtype != torch.uint8 else t
    return {"dtype": name, "shape": list(t.shape), "data": raw.numpy().tobytes()}


def tensor_from_wire(d: dict[str, Any]) -> torch.Tensor:
    try:
        dtype = _DTYPES[d["dtype"]]
        shape = [int(s) for s in d["shape"]]
        data = bytearray(d["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise WireError(f"malformed tensor: {e}") from e
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if flat.numel() != numel * itemsize:
        raise WireError(
            f"tensor data has {flat.numel()} bytes, shape {shape} needs {numel * itemsize}"
        )
    return flat.view(dtype).reshape(shape).clone()


def encode(msg_type: str, **fields: Any) -> bytes:
    if msg_type not in SCHEMAS:
        raise WireError(f"unknown message type {msg_type!r}")
    return msgpack.packb({"type": msg_type, **fields}, use_bin_type=True)


def decode(raw: bytes) -> dict[str, Any]:
    """Unpack and check a message against its schema; raises WireError."""
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"undecodable message: {e}") from e
    if not isinstance(msg, dict) or msg.get("type") not in SCHEMAS:
        raise WireError(f"unknown message: {str(msg)[:80]}")
    for name, kind in SCHEMAS[msg["type"]].items():
        if not isinstance(msg.get(name), kind):
            raise WireError(f"{msg['type']}: field {name!r} missing or not {kind}")
    return msg

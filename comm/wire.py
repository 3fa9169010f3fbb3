"""Control-plane wire format: msgpack maps with a type tag, validated on receipt; tensors as raw
bytes with dtype and shape. Nothing received is ever unpickled.

Two kinds of messages share one tag space:
* typed records: dataclasses registered with `@message("tag")`; `encode(record)` and `decode`
  returns the record, every field checked against its annotation (nested lists, dicts, optionals,
  tensors, nested dataclasses);
* schema messages (`SCHEMAS`, the cluster's plans and results): `encode("tag", **fields)` and
  `decode` returns a dict whose top-level fields were type-checked.

Any malformed or unknown input raises `WireError` (a ValueError), never anything else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import msgpack
import torch

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

# message type -> required fields and their python types
# Every worker message also carries `inc` (the incarnation: new for each process of a rank) and
# `gen` (the data-plane generation it is in), checked by the driver.
SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "ready": {"rank": int, "inc": int, "role": str, "param_bytes": int, "pid": int},
    "error": {"rank": int, "role": str, "message": str},
    # failures: driver -> worker `abort` (leave the step and the data plane), `reform` (join
    # generation gen); worker -> driver `aborted`, `joined`, `step_failed`, `reform_failed`
    "abort": {"gen": int},
    "reform": {"gen": int},
    "aborted": {"rank": int, "inc": int, "gen": int},
    "joined": {"rank": int, "inc": int, "gen": int},
    "step_failed": {"rank": int, "inc": int, "step": int, "message": str},
    "reform_failed": {"rank": int, "inc": int, "message": str},
    "attn_step": {
        "step": int,
        "micro_batches": list,
        "release": list,
        "imports": list,
        "num_steps": int,
        "trace": bool,
    },
    "prefill_step": {"step": int, "micro_batches": list, "exports": list, "trace": bool},
    # errors: [[seq_id, why its sampling failed]] (its token is -1)
    # prompt_logprobs: [[seq_id, first position, [{token: [logprob, rank]}, ...]], ...]
    "prefill_result": {
        "rank": int,
        "step": int,
        "sampled": list,
        "errors": list,
        "prompt_logprobs": list,
        "times": dict,
        "events": list,
    },
    "expert_step": {
        "step": int,
        "sources": list,
        "num_micro_batches": int,
        "num_steps": int,
        "trace": bool,
    },
    # sampled: one [[seq_id, token, logprobs], ...] list per decode step of the plan;
    # wire: bytes this attention worker put on the data plane ("dispatch") and got ("combine")
    "attn_result": {
        "rank": int,
        "step": int,
        "sampled": list,
        "errors": list,
        "prompt_logprobs": list,
        "times": dict,
        "events": list,
        "wire": dict,
    },
    "expert_result": {"rank": int, "step": int, "times": dict, "events": list, "load": list},
    "shutdown": {},
}

# type tag -> registered record class
RECORDS: dict[str, type] = {}


class WireError(ValueError):
    """A malformed or unknown message."""


# ---- tensors ------------------------------------------------------------------------------------


def tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    """Tensor -> {"dtype", "shape", "data"}: raw little-endian bytes, any device, bf16 included."""
    t = t.detach().contiguous().cpu()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise WireError(f"dtype {name} cannot travel")
    raw = t.reshape(-1).view(torch.uint8)  # bf16/fp8 have no numpy dtype: ship the bytes
    return {"dtype": name, "shape": list(t.shape), "data": raw.numpy().tobytes()}


def tensor_from_wire(d: Any) -> torch.Tensor:
    """Inverse of tensor_to_wire; raises WireError on a bad dtype, shape or byte count."""
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise WireError("malformed tensor: expected a map with dtype, shape, data")
    dtype = _DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
    if dtype is None:
        raise WireError(f"malformed tensor: unknown dtype {str(d['dtype'])[:40]!r}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise WireError(f"malformed tensor: bad shape {str(shape)[:80]}")
    data = d["data"]
    if not isinstance(data, bytes | bytearray):
        raise WireError("malformed tensor: data is not bytes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if len(data) != numel * itemsize:
        raise WireError(
            f"tensor data has {len(data)} bytes, shape {shape} needs {numel * itemsize}"
        )
    if not data:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # own, writable copy
    return flat.view(dtype).reshape(shape)


# ---- typed records ------------------------------------------------------------------------------


def message(tag: str):
    """Class decorator: make a dataclass a wire record with type tag `tag`."""

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(cls)
        if tag in RECORDS or tag in SCHEMAS:
            raise ValueError(f"wire tag {tag!r} is already registered")
        cls.wire_tag = tag
        RECORDS[tag] = cls
        return cls

    return register


def _hints(cls: type) -> dict[str, Any]:
    cached = cls.__dict__.get("_wire_hints")
    if cached is None:
        cached = typing.get_type_hints(cls)
        cls._wire_hints = cached
    return cached


def _to_wire(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor_to_wire(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _check(value: Any, hint: Any, path: str) -> Any:
    """Validate a decoded value against a type annotation; returns the typed value."""
    if hint is Any:
        return value
    if hint is None or hint is type(None):
        if value is not None:
            raise WireError(f"{path}: expected None")
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        for option in args:
            try:
                return _check(value, option, path)
            except WireError:
                continue
        raise WireError(f"{path}: {type(value).__name__} matches none of {hint}")
    if hint is torch.Tensor:
        try:
            return tensor_from_wire(value)
        except WireError as e:
            raise WireError(f"{path}: {e}") from None
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise WireError(f"{path}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise WireError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _check(v, a, f"{path}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        items = [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{path}: expected a map, got {type(value).__name__}")
        key_hint, val_hint = args if args else (Any, Any)
        return {
            _check(k, key_hint, f"{path} key"): _check(v, val_hint, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise WireError(f"{path}: expected a map for {hint.__name__}")
        return _build(hint, value, path)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{path}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WireError(f"{path}: expected int, got {type(value).__name__}")
        return value
    if hint is bytes:
        if not isinstance(value, bytes | bytearray):
            raise WireError(f"{path}: expected bytes, got {type(value).__name__}")
        return bytes(value)
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise WireError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise WireError(f"{path}: type {hint} cannot travel")


def _build(cls: type, fields: dict[str, Any], path: str) -> Any:
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(fields) - set(known)
    if extra:
        raise WireError(f"{path}: unknown fields {sorted(map(str, extra))[:5]}")
    kwargs = {}
    for name, f in known.items():
        if name not in fields:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{path}: missing field {name!r}")
            continue
        kwargs[name] = _check(fields[name], hints[name], f"{path}.{name}")
    return cls(**kwargs)


# ---- encode / decode ----------------------------------------------------------------------------


def encode(msg: Any, **fields: Any) -> bytes:
    """A registered record -> bytes, or a schema message: encode("attn_step", step=..., ...)."""
    if isinstance(msg, str):
        if msg not in SCHEMAS:
            raise WireError(f"unknown message type {msg!r}")
        return msgpack.packb({"type": msg, **fields}, use_bin_type=True)
    tag = getattr(type(msg), "wire_tag", None)
    if tag is None or RECORDS.get(tag) is not type(msg):
        raise WireError(f"{type(msg).__name__} is not a registered wire record")
    if fields:
        raise WireError("extra keyword fields are only for schema messages")
    body = _to_wire(msg)
    return msgpack.packb({"type": tag, **body}, use_bin_type=True)


def decode(raw: bytes, expect: type | None = None) -> Any:
    """Unpack and check a message: a record instance, or a dict for schema messages.
    `expect` (a record class) rejects any other type. Raises WireError only."""
    try:
        msg = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise WireError(f"undecodable message: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict):
        raise WireError(f"message is a {type(msg).__name__}, not a map")
    tag = msg.pop("type", None)
    if not isinstance(tag, str) or (tag not in SCHEMAS and tag not in RECORDS):
        raise WireError(f"unknown message type {str(tag)[:40]!r}")
    if expect is not None and getattr(expect, "wire_tag", None) != tag:
        raise WireError(f"expected a {getattr(expect, 'wire_tag', expect)!r} message, got {tag!r}")
    if tag in RECORDS:
        try:
            return _build(RECORDS[tag], msg, tag)
        except WireError:
            raise
        except Exception as e:  # e.g. a record's __post_init__ rejecting values
            raise WireError(f"{tag}: {type(e).__name__}: {e}") from None
    for name, kind in SCHEMAS[tag].items():
        value = msg.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise WireError(f"{tag}: field {name!r} missing or not {kind}")
    msg["type"] = tag
    return msg

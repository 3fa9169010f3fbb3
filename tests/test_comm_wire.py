"""Wire format: tensors as raw bytes, typed records, schema messages, malformed input."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest
import torch
from afd.comm import wire
from afd.comm.wire import WireError, decode, encode, message, tensor_from_wire, tensor_to_wire


@message("test_plan")
@dataclass
class Plan:
    step: int
    sources: list[int]
    times: dict[str, float]
    hidden: torch.Tensor
    note: str | None = None
    pairs: list[tuple[int, str]] = field(default_factory=list)


@message("test_outer")
@dataclass
class Outer:
    plans: list[Plan]
    flag: bool


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
    + [torch.bool, torch.float64, torch.int8],
)
def test_tensor_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    back = tensor_from_wire(msgpack.unpackb(msgpack.packb(tensor_to_wire(t))))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_tensor_edge_cases():
    empty = tensor_from_wire(tensor_to_wire(torch.empty(0, 7, dtype=torch.bfloat16)))
    assert empty.shape == (0, 7) and empty.dtype == torch.bfloat16
    scalar = tensor_from_wire(tensor_to_wire(torch.tensor(3.5)))
    assert scalar.shape == () and scalar.item() == 3.5
    strided = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    assert torch.equal(tensor_from_wire(tensor_to_wire(strided)), strided)
    back = tensor_from_wire(tensor_to_wire(torch.ones(2)))
    back += 1  # own, writable memory
    assert back.tolist() == [2.0, 2.0]


@pytest.mark.parametrize(
    "bad",
    [
        {"dtype": "float32", "shape": [2], "data": b"\x00" * 7},
        {"dtype": "complex", "shape": [1], "data": b"\x00" * 8},
        {"dtype": "float32", "shape": [-1], "data": b""},
        {"dtype": "float32", "shape": "2", "data": b"\x00" * 8},
        {"dtype": "float32", "shape": [2], "data": "text"},
        {"dtype": "float32", "shape": [2]},
        [1, 2, 3],
    ],
)
def test_malformed_tensor(bad):
    with pytest.raises(WireError):
        tensor_from_wire(bad)


def test_record_round_trip():
    plan = Plan(3, [0, 2], {"attn": 0.5, "ffn": 1}, torch.randn(2, 4).to(torch.bfloat16))
    plan.pairs = [(1, "a"), (2, "b")]
    back = decode(encode(plan))
    assert isinstance(back, Plan)
    assert back.step == 3 and back.sources == [0, 2] and back.note is None
    assert back.times == {"attn": 0.5, "ffn": 1.0} and isinstance(back.times["ffn"], float)
    assert back.pairs == [(1, "a"), (2, "b")]
    assert torch.equal(back.hidden, plan.hidden) and back.hidden.dtype == torch.bfloat16
    outer = decode(encode(Outer([plan, plan], True)), expect=Outer)
    assert len(outer.plans) == 2 and torch.equal(outer.plans[1].hidden, plan.hidden)
    with pytest.raises(WireError, match="expected"):
        decode(encode(plan), expect=Outer)


def _raw(**fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


HIDDEN = tensor_to_wire(torch.zeros(1))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1\xc1\xc1",  # never-used msgpack byte
        b"\x92\x01\x02",  # a list, not a map
        _raw(type="no_such_type"),
        _raw(type=7),
        _raw(step=1),  # no tag
        _raw(type="test_plan", step=1, sources=[0], times={}),  # missing hidden
        _raw(type="test_plan", step="1", sources=[0], times={}, hidden=HIDDEN),
        _raw(type="test_plan", step=True, sources=[0], times={}, hidden=HIDDEN),
        _raw(type="test_plan", step=1, sources=[0, "x"], times={}, hidden=HIDDEN),
        _raw(type="test_plan", step=1, sources=[0], times={"a": "b"}, hidden=HIDDEN),
        _raw(type="test_plan", step=1, sources=[0], times={}, hidden={"dtype": "float32"}),
        _raw(type="test_plan", step=1, sources=[0], times={}, hidden=HIDDEN, extra=1),
        _raw(type="test_plan", step=1, sources=[0], times={}, hidden=HIDDEN, pairs=[[1, 2]]),
        _raw(type="test_outer", plans=[{"step": 1}], flag=True),
        _raw(
            type="expert_step",
            step=1,
            sources=[0],
            num_micro_batches="2",
            num_steps=1,
            trace=False,
        ),
        _raw(type="ready", rank=0, role="expert"),
    ],
)
def test_malformed_messages_raise_wire_error(raw):
    with pytest.raises(WireError):
        decode(raw)


def test_schema_messages():
    raw = encode(
        "expert_step", step=4, sources=[0, 1], num_micro_batches=2, num_steps=3, trace=False
    )
    msg = decode(raw)
    assert msg == {
        "type": "expert_step",
        "step": 4,
        "sources": [0, 1],
        "num_micro_batches": 2,
        "num_steps": 3,
        "trace": False,
    }
    assert decode(encode("shutdown")) == {"type": "shutdown"}
    with pytest.raises(WireError):
        encode("nonsense", a=1)
    with pytest.raises(WireError):
        encode(object())


def test_tags_are_unique():
    with pytest.raises(ValueError):
        message("test_plan")(type("Again", (), {"__annotations__": {"a": "int"}}))
    with pytest.raises(ValueError):
        message("attn_step")(type("Clash", (), {"__annotations__": {"a": "int"}}))
    assert wire.RECORDS["test_plan"] is Plan

"""Wire format: control-plane records round-trip and are checked at the boundary (nested fields
included); tensors as raw bytes; malformed input is a WireError, never anything else."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from afd.comm import wire
from afd.comm.messages import (
    Abort,
    AttnResult,
    AttnStep,
    Crashed,
    ExpertStep,
    Heartbeat,
    KvTransfer,
    PlanEntry,
    PrefillResult,
    PrefillStep,
    PromptLogprobs,
    Ready,
    Sampled,
    SampleError,
    SampleSpec,
    Shutdown,
    StepFailed,
    WireBytes,
    WorkerSpec,
)
from afd.comm.wire import TensorBytes, WireError
from afd.sampling.params import SamplingParams, StructuredOutputsParams
from afd.scheduler.cluster.executor import plan_entry
from afd.scheduler.core.sequence import Sequence

decode_tensor = wire.Decoder(TensorBytes)


def _entry(**over) -> dict:
    """A plan entry as the driver's encoder writes it (a map)."""
    return {"seq_id": 3, "tokens": [5, 6], "start": 0, "block_table": [0], **over}


def _attn_step(**over) -> dict:
    return {"type": "attn_step", "step": 1, "micro_batches": [[_entry()]], **over}


def _raw(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
    + [torch.bool, torch.float64, torch.int8, torch.float8_e4m3fn],
)
def test_tensor_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    back = decode_tensor(wire.encode(TensorBytes.of(t))).to_tensor()
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_tensor_edge_cases():
    empty = TensorBytes.of(torch.empty(0, 7, dtype=torch.bfloat16)).to_tensor()
    assert empty.shape == (0, 7) and empty.dtype == torch.bfloat16
    scalar = TensorBytes.of(torch.tensor(3.5)).to_tensor()
    assert scalar.shape == () and scalar.item() == 3.5
    strided = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    assert torch.equal(TensorBytes.of(strided).to_tensor(), strided)
    back = TensorBytes.of(torch.ones(2)).to_tensor()
    back += 1  # own, writable memory
    assert back.tolist() == [2.0, 2.0]
    with pytest.raises(WireError, match="cannot travel"):
        TensorBytes.of(torch.zeros(2, dtype=torch.complex64))


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
        decode_tensor(_raw(bad)).to_tensor()


def test_plans_round_trip_with_nested_records():
    spec = SampleSpec.of(
        SamplingParams(temperature=0.7, seed=-3, logprobs=2, logit_bias={9: -1.5, 4: 2.0},
                       min_tokens=2, stop_token_ids=[8], prompt_logprobs=1,
                       structured_outputs=StructuredOutputsParams(regex="a+"))
    )  # fmt: skip
    entry = PlanEntry(7, [1, 2], 4, [0, 3], True, spec, index=1, prompt_len=3,
                      prompt_targets=[2], history=[5, 5, 5, 5])  # fmt: skip
    plan = AttnStep(step=9, micro_batches=[[entry], []], num_steps=2, release=[1],
                    imports=[KvTransfer(7, 3, [0, 3])], trace=True)  # fmt: skip
    back = wire.decode_to_worker(wire.encode(plan))
    assert back == plan and isinstance(back, AttnStep)
    assert back.micro_batches[0][0].params.logit_bias == ((4, 2.0), (9, -1.5))
    assert back.micro_batches[0][0].params.structured_outputs == ("regex", "a+")
    for other in (PrefillStep(step=2, entries=[entry]), Abort(gen=4), Shutdown(),
                  ExpertStep(step=1, sources=[0, 1], num_micro_batches=2)):  # fmt: skip
        assert wire.decode_to_worker(wire.encode(other)) == other


def test_results_round_trip():
    lps = {5: (-0.25, 1), 6: (-math.inf, 9)}
    result = AttnResult(rank=1, inc=2**47, gen=3, step=9, times={"attention": 0.5},
                        events=[("attention", "attn L0 mb0", 1, 2)],
                        sampled=[[Sampled(7, 5, lps)], [Sampled(7, -1)]],
                        errors=[SampleError(7, "boom")],
                        prompt_logprobs=[PromptLogprobs(7, 1, [lps])],
                        wire=WireBytes(dispatch=10, combine=20))  # fmt: skip
    back = wire.decode_from_worker(wire.encode(result))
    assert back == result and back.sampled[0][0].logprobs[6][0] == -math.inf
    for other in (Ready(rank=0, inc=1, gen=-1, role="expert", param_bytes=10, pid=99),
                  StepFailed(rank=0, inc=1, gen=0, step=3, message="x"),
                  PrefillResult(rank=2, inc=1, gen=0, step=1)):  # fmt: skip
        assert wire.decode_from_worker(wire.encode(other)) == other
    for pipe in (Heartbeat(0.5), Crashed("Traceback ...")):
        assert wire.decode_to_supervisor(wire.encode(pipe)) == pipe


def test_sample_spec_rebuilds_the_sampler_view():
    p = SamplingParams(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, seed=2**63 - 1,
                       presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                       logit_bias={3: 1.0}, min_tokens=3, stop_token_ids=[4],
                       structured_outputs=StructuredOutputsParams(choice=["a", "b"]))  # fmt: skip
    q = SampleSpec.of(p).to_params()
    assert q.wire == p.wire
    assert SampleSpec.of(SamplingParams()) == SampleSpec()
    assert hash(SampleSpec.of(p)) == hash(SampleSpec.of(p))  # workers cache on it
    assert wire.encode(PlanEntry(0, [1], 0, [])) == _raw(_entry(seq_id=0, tokens=[1],
                                                                block_table=[]))  # fmt: skip


def test_plan_entry_carries_params_only_where_sampled():
    p = SamplingParams(temperature=0, presence_penalty=1.0, prompt_logprobs=1)
    seq = Sequence("r", 0, [10, 11, 12, 13], p)
    seq.block_table, seq.num_computed_tokens = [4], 2
    plain = plan_entry(Sequence("r", 0, [1, 2], SamplingParams()), 2, False)
    assert plain.params is None and plain.history is None and not plain.prompt_targets
    e = plan_entry(seq, 2, True, with_history=True)
    assert (e.tokens, e.start, e.block_table, e.sample) == ([12, 13], 2, [4], True)
    assert e.params == SampleSpec.of(p) and e.prompt_len == 4 and e.index == 0
    assert e.prompt_targets == [13] and e.history == [10, 11]
    assert wire.decode_to_worker(wire.encode(AttnStep(step=1, micro_batches=[[e]]))).micro_batches
    assert plan_entry(seq, 2, True).history is None  # the worker has it already


def _spec(**over) -> dict:
    fields = dict(
        model_path="/m", tokenizer_dir="/m", dtype="bfloat16", device="cpu", block_size=16,
        num_kv_blocks=8, world_size=2, init_addr="127.0.0.1:1", driver_addr="ipc:///x",
        inbox_addrs={0: "ipc:///a", 1: "ipc:///b"}, num_attention_workers=1,
        num_expert_workers=1, expert_ranks=[1], comm_backend="shm", dist_backend="auto",
        gpus_per_node=None, dispatch_dtype="auto", quantization=None, shm_dir=None, threads=1,
        dist_timeout_s=60.0,
    )  # fmt: skip
    return {**fields, **over}


def test_worker_spec_is_checked():
    spec = wire.decode_spec(_raw(_spec(rank=1)))
    assert isinstance(spec, WorkerSpec) and spec.inbox_addrs[1] == "ipc:///b" and spec.rank == 1
    assert wire.decode_spec(wire.encode(spec)) == spec
    missing = _spec()
    del missing["block_size"]
    bad_values = [
        _spec(threads="1"),
        _spec(inbox_addrs={"0": "ipc:///a"}),
        _spec(expert_ranks=[-1]),
        _spec(dist_timeout_s=math.nan),
        _spec(extra=1),
    ]
    for bad in [missing, *bad_values]:
        with pytest.raises(WireError):
            wire.decode_spec(_raw(bad))


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "truncated"),
        (b"\xc1\xc1\xc1", ""),  # never-used msgpack byte
        (b"\x92\x01\x02", "array"),  # a list, not a map
        (_raw({"step": 1}), "type"),  # no tag
        (_raw({"type": "no_such_type"}), "type"),
        (_raw({"type": 7}), "type"),
        (_raw({"type": "attn_result", "rank": 0, "inc": 0, "gen": 0, "step": 1}), "type"),
        (_raw({"type": "abort"}), "gen"),  # missing field
        (_raw(_attn_step(step="1")), "step"),
        (_raw(_attn_step(step=True)), "step"),
        (_raw(_attn_step(extra=1)), "extra"),
        (_raw(_attn_step(num_steps=0)), "num_steps"),
        (_raw(_attn_step(micro_batches=[_entry()])), "micro_batches"),
        (_raw(_attn_step(micro_batches=[[_entry(tokens=[5, "x"])]])), "tokens"),
        (_raw(_attn_step(micro_batches=[[_entry(tokens=[2**64 - 1])]])), "tokens"),
        (_raw(_attn_step(micro_batches=[[_entry(seq_id=-1)]])), "seq_id"),
        (_raw(_attn_step(micro_batches=[[_entry(sample=1)]])), "sample"),
        (_raw(_attn_step(micro_batches=[[_entry(extra=[])]])), "extra"),
        (_raw(_attn_step(micro_batches=[[_entry(params={"temperature": math.nan})]])), "temp"),
        (_raw(_attn_step(micro_batches=[[_entry(params={"top_p": math.inf})]])), "top_p"),
        (_raw(_attn_step(micro_batches=[[_entry(params={"seed": 2**64 - 1})]])), "seed"),
        (_raw(_attn_step(micro_batches=[[_entry(params={"index": 0})]])), "index"),
        (_raw(_attn_step(micro_batches=[[_entry(params={"logit_bias": [[1]]})]])), "logit"),
        (_raw(_attn_step(imports=[[1, 2]])), "imports"),
        (_raw(_attn_step(imports=[{"seq_id": 1, "peer": 2, "blocks": []}])), "imports"),
    ],
)
def test_malformed_plans_raise_wire_error(raw, why):
    with pytest.raises(WireError, match=f"(?i){why}"):
        wire.decode_to_worker(raw)


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "ready", "rank": 0, "inc": 1, "gen": 0, "role": "expert"},  # no pid, param_bytes
        {"type": "attn_step", "step": 1, "micro_batches": []},  # the other direction
        {"type": "attn_result", "rank": 0, "inc": 1, "gen": 0, "step": 1, "sampled": [[[1]]]},
        {"type": "attn_result", "rank": 0, "inc": 1, "gen": 0, "step": 1,
         "sampled": [[[1, 2, {"3": [-1.0, 1]}]]]},  # a logprobs key that is not a token id
        {"type": "attn_result", "rank": 0, "inc": 1, "gen": 0, "step": 1,
         "wire": {"dispatch": 1, "bytes": 2}},
        {"type": "expert_result", "rank": 0, "inc": 1, "gen": 0, "step": 1, "load": [1.5]},
        {"type": "step_failed", "rank": 2**64 - 1, "inc": 1, "gen": 0, "step": 1, "message": ""},
    ],
)  # fmt: skip
def test_malformed_results_raise_wire_error(fields):
    with pytest.raises(WireError):
        wire.decode_from_worker(_raw(fields))


def test_only_records_are_encoded():
    with pytest.raises(WireError):
        wire.encode({"type": "shutdown"})
    with pytest.raises(WireError, match="malformed"):
        wire.decode_to_supervisor(_raw({"stuck": 1.0}))  # the old untyped pipe message
    assert msgspec.structs.replace(Shutdown()) == Shutdown()

"""The engine-core process (afd.engine.core) and its client (afd.engine.core_client): the wire
records refuse malformed frames, a core survives them, two API clients share one core, an API
process that dies loses only its own requests, a core killed mid-stream fails the stream at
once, and `afd serve --api-server-count 2` serves and stops with no orphan."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import msgspec
import pytest
import zmq
from conftest import launched

from afd import LLM, SamplingParams
from afd.config import EngineConfig
from afd.engine import core_records as rec
from afd.engine.async_engine import EngineDeadError
from afd.engine.core import pid_alive
from afd.engine.core_client import CoreClient, CoreProcess

MODEL = "tiny-qwen3-moe"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _config() -> EngineConfig:
    return EngineConfig.from_flat(model=MODEL, dtype="float32", num_attention_workers=0)


def _add(**change) -> dict:
    frame = {
        "client": 0,
        "request_id": "r",
        "prompt_token_ids": [1, 2],
        "params": {"max_tokens": 2},
        "arrival": 1.0,
    }
    return {**frame, **change}


def _frame(tag: str, fields: dict) -> bytes:
    return msgspec.msgpack.encode([tag, *fields.values()])


# -- records: no frame gets past the decoder unless every field is declared and in range --------


def test_a_well_formed_request_decodes_with_its_sampling_params():
    msg = rec.to_core.decode(_frame("add", _add(params={"n": 2, "stop": "x", "seed": -(2**63)})))
    assert isinstance(msg, rec.AddRequest)
    assert msg.params.n == 2 and msg.params.stop == ["x"] and msg.params.seed == -(2**63)


@pytest.mark.parametrize(
    "frame",
    [
        _frame("add", {k: v for k, v in _add().items() if k != "arrival"}),  # missing field
        _frame("add", _add(prompt_token_ids="12")),  # wrong type
        _frame("add", _add(prompt_token_ids=[1, 2**63])),  # past int64
        msgspec.msgpack.encode(["add", 0, "r", [1, 2**64 - 1], {}, 1.0]),  # uint64, past int64
        _frame("add", _add(params={"n": "2"})),  # nested wrong type
        _frame("add", _add(params={"temperature": -1.0})),  # SamplingParams' own check
        _frame("add", _add(request_id="")),
        _frame("add", _add(client=-1)),
        _frame("add", {**_add(), "extra": 1}),  # one field too many
        _frame("launch", _add()),  # unknown tag
        msgspec.msgpack.encode({"client": 0}),  # a map, not a record
        b"\xc1garbage",  # not msgpack
    ],
)
def test_malformed_frames_are_refused(frame):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        rec.to_core.decode(frame)


# -- a live core --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core():
    proc = CoreProcess(_config(), max_queue_len=8, log_level="warning")
    try:
        yield proc
    finally:
        proc.stop()
    assert proc.process.returncode == 0


@pytest.fixture(scope="module")
def clients(core):
    pair = [CoreClient(core.addresses, core.pid, i) for i in (0, 1)]
    yield pair
    for c in pair:
        c.close()


async def _collect(client: CoreClient, rid: str, ids: list[int], params=GREEDY) -> list:
    return [out async for out in client.generate(rid, ids, params)]


def test_two_api_clients_share_one_core_and_match_offline(clients):
    a, b = clients
    prompts = [a.tokenizer.encode(t) for t in ("Hello there", "The quick brown fox")]

    async def both():
        return await asyncio.gather(_collect(a, "a-0", prompts[0]), _collect(b, "b-0", prompts[1]))

    got = asyncio.run(both())
    want = LLM(MODEL, dtype="float32").generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    for outs, w in zip(got, want, strict=True):
        last = outs[-1]
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert last.outputs[0].token_ids == w.outputs[0].token_ids
        assert last.outputs[0].text == w.outputs[0].text
        assert last.metrics is not None and last.metrics.finished_time is not None


def test_stop_strings_and_logprobs_in_the_api_process_match_offline(clients):
    """The core sends token ids only; the API's OutputProcessor cuts at the stop string (and
    drops the tokens the core made past it) as the offline engine does."""
    a, _ = clients
    llm = LLM(MODEL, dtype="float32")
    prompt = a.tokenizer.encode("Hello there")
    long = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    text = llm.generate([{"prompt_token_ids": prompt}], long)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                            logprobs=2, prompt_logprobs=1)  # fmt: skip
    want_all = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    want = want_all.outputs[0]
    outs = asyncio.run(_collect(a, "stop-0", prompt, params))
    got = outs[-1].outputs[0]
    assert (got.text, got.finish_reason, got.stop_reason) == (want.text, "stop", stop)
    assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.token_ids)
    # the API process names every logprob's token, as the offline engine does
    assert got.logprobs == want.logprobs
    assert outs[-1].prompt_logprobs == want_all.prompt_logprobs
    # each snapshot is its own: the first one did not grow with the later ones
    assert len(outs[0].outputs[0].token_ids) < len(got.token_ids) or len(outs) == 1


def test_a_grammar_compiles_beside_the_loop_and_constrains_the_output(clients):
    a, b = clients
    choice = SamplingParams(max_tokens=8, structured_outputs={"choice": ["yes", "no"]})

    async def both():
        plain = asyncio.ensure_future(_collect(b, "plain-0", [1, 2, 3]))
        constrained = await _collect(a, "choice-0", [1, 2, 3], choice)
        return constrained, await plain

    constrained, plain = asyncio.run(both())
    assert constrained[-1].outputs[0].text in ("yes", "no")
    assert plain[-1].finished

    async def bad():
        bad_regex = SamplingParams(max_tokens=4, structured_outputs={"regex": "(unclosed"})
        with pytest.raises(ValueError):
            await _collect(a, "bad-regex", [1, 2], bad_regex)

    asyncio.run(bad())


def test_bad_requests_are_value_errors_and_the_core_goes_on(core, clients):
    a, _ = clients
    vocab = a.tokenizer.vocab_size

    async def bad():
        with pytest.raises(ValueError, match="out of range"):
            await _collect(a, "bad-0", [vocab + 10])
        with pytest.raises(ValueError, match="n must be at most"):
            await _collect(a, "bad-1", [1, 2], SamplingParams(n=10_000))

    asyncio.run(bad())
    # garbage, an abort of an unknown id and a request of a client that said no hello
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(core.addresses.input)
    for frame in (b"\x00\x01", _frame("add", _add(prompt_token_ids=[2**64 - 1]))):
        sock.send(frame)
    sock.send(rec.encode(rec.Abort(0, ["no-such-request"])))
    sock.send(rec.encode(rec.AddRequest(99, "ghost", [1, 2], GREEDY, 0.0)))
    sock.close(linger=1000)
    outs = asyncio.run(_collect(a, "after-garbage", [1, 2, 3]))
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == GREEDY.max_tokens
    assert a.health() == (True, "ok")


_DYING_CLIENT = """
import asyncio, os, sys
from afd.engine.core_client import CoreAddresses, CoreClient
from afd.sampling.params import SamplingParams
c = CoreClient(CoreAddresses.at(sys.argv[1]), int(sys.argv[2]), 2)
async def go():
    params = SamplingParams(max_tokens=100000, ignore_eos=True)
    async for _ in c.generate("doomed", [1, 2, 3], params):
        print("streaming", flush=True)
        os._exit(0)  # dies mid-stream, without a goodbye
asyncio.run(go())
"""


def test_an_api_process_that_dies_loses_only_its_requests(core, clients):
    a, _ = clients
    dying = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_DYING_CLIENT), core.addresses.folder,
         str(core.pid)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert dying.stdout.readline().strip() == "streaming"
    assert dying.wait(timeout=30) == 0
    outs = asyncio.run(_collect(a, "survivor", [4, 5, 6]))
    assert outs[-1].finished
    deadline = time.monotonic() + 10
    while a.stats().get("num_requests_running", 1.0) > 0:  # the core aborted "doomed"
        assert time.monotonic() < deadline, a.stats()
        time.sleep(0.1)
    assert pid_alive(core.pid)


def test_a_core_killed_mid_stream_fails_the_stream_and_health():
    proc = CoreProcess(_config(), max_queue_len=8, log_level="warning")
    try:
        client = CoreClient(proc.addresses, proc.pid)

        async def stream():
            params = SamplingParams(max_tokens=100000, ignore_eos=True)
            with pytest.raises(EngineDeadError, match="died"):
                async for _ in client.generate("long", [1, 2, 3], params):
                    if proc.process.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):  # a new request fails at once
                await _collect(client, "later", [1, 2])

        asyncio.run(asyncio.wait_for(stream(), timeout=30))
        ok, reason = client.health()
        assert not ok and "died" in reason
        client.close()
    finally:
        proc.stop()


# -- afd serve --------------------------------------------------------------------------------


def test_serve_with_two_api_processes_serves_and_stops_cleanly():
    args = (MODEL, "--num-attention-workers", "0", "--dtype", "float32",
            "--api-server-count", "2")  # fmt: skip
    with launched(*args, serve=True) as (base, proc):
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        pids = [int(p) for p in children.stdout.split()]
        assert len(pids) == 2  # the core and the second API process
        body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        texts = {
            httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
            for _ in range(6)
        }
        assert len(texts) == 1
        assert httpx.get(f"{base}/health", timeout=5).json() == {"status": "ok"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert not any(pid_alive(p) for p in pids)
    want = LLM(MODEL, dtype="float32").generate(
        ["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )
    assert texts == {want[0].outputs[0].text}

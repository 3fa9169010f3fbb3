"""Attacks on a real 1A+1F cluster's control sockets while 8 requests stream (issue 22 item 2):
a forged `ready` (unsigned, and signed with another key) and a replayed worker record to the
driver's inbox; a replayed plan, another rank's plan and an unsigned `shutdown` down a worker's
plan port; a rogue PULL and a rogue DEALER (with a forged hello) on a plan port get
nothing. Nothing changes (no recovery, no replaced worker, the same tokens), and the driver
logs what it dropped."""

from __future__ import annotations

import logging

import pytest
import zmq
from conftest import assert_cleaned_up, greedy_and_seeded, mixed_prompts

from afd import LLM
from afd.comm import auth, wire
from afd.comm.messages import Ready, Shutdown

pytestmark = pytest.mark.slow

NUM_REQUESTS = 8


def run(llm: LLM, attacks: dict | None = None) -> list[list[int]]:
    """Stream the workload; attacks maps an engine step to a callable run before it."""
    eng = llm.engine
    work = greedy_and_seeded(mixed_prompts(NUM_REQUESTS, 512, seed=5), 4, 8, seed=77)
    ids = {eng.add_request(p, sp): i for i, (p, sp) in enumerate(work)}
    attacks, done, step = dict(attacks or {}), {}, 0
    while len(done) < NUM_REQUESTS:
        assert step < 200, "the workload did not finish"
        if step in attacks:
            attacks.pop(step)()
        for out in eng.step():
            assert out.error is None, out.error
            if out.finished:
                done[ids[out.request_id]] = out.outputs[0].token_ids
        step += 1
    assert not attacks, f"the workload ended before the attacks at steps {sorted(attacks)}"
    return [done[i] for i in range(NUM_REQUESTS)]


@pytest.fixture(scope="module")
def cluster():
    llm = LLM("tiny-deepseek-v3", dtype="float32", block_size=4, num_attention_workers=1,
              num_expert_workers=1, worker_timeout_s=10.0)  # fmt: skip
    ex = llm.engine.executor
    try:
        yield llm, run(llm)  # the fault-free run
    finally:
        llm.shutdown()
    assert_cleaned_up(ex)


def recording(ex) -> tuple[dict[int, list[bytes]], list[bytes]]:
    """Frames the driver sends (per rank) and the worker frames it accepts, as a tap would."""
    sent: dict[int, list[bytes]] = {}
    taken: list[bytes] = []
    frame, opener = ex.channel._frame, ex.channel.opener.open

    def tap_frame(rank, msg):
        sent.setdefault(rank, []).append(frame(rank, msg))
        return sent[rank][-1]

    def tap_open(raw):
        payload = opener(raw)
        if payload is not None:
            taken.append(raw)
        return payload

    ex.channel._frame, ex.channel.opener.open = tap_frame, tap_open
    return sent, taken


def test_forged_replayed_and_unsigned_records_change_nothing(cluster, caplog):
    llm, expected = cluster
    ex = llm.engine.executor
    pids = {w.rank: w.process.pid for w in ex.supervisor.workers}
    stats = llm.engine.failure_stats()
    sent, taken = recording(ex)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.PUSH)
    rogue.setsockopt(zmq.LINGER, 2000)
    rogue.connect(ex.layout.driver_addr())
    forged = wire.encode(Ready(rank=0, inc=1, gen=0, role="attention", param_bytes=0, pid=1))
    attacker = auth.Sealer(bytes(32))
    pull, dealer = ctx.socket(zmq.PULL), ctx.socket(zmq.DEALER)  # on worker 0's plan port
    for sock in (pull, dealer):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ex.layout.inbox_addr(0))
    dealer.send(attacker.seal(auth.hello_tag(0), b""))
    attacks = {
        1: lambda: rogue.send(forged),  # unsigned `ready`
        2: lambda: rogue.send(attacker.seal(auth.DRIVER_TAG, forged)),  # another key
        3: lambda: rogue.send(taken[0]),  # a worker's record again
        4: lambda: ex.channel._deliver(0, sent[0][0], 0),  # a plan again, to its worker
        5: lambda: ex.channel._deliver(0, sent[1][0], 0),  # the expert's plan to rank 0
        6: lambda: ex.channel._deliver(1, wire.encode(Shutdown()), 0),  # unsigned
    }
    try:
        with caplog.at_level(logging.WARNING, logger="afd.auth"):
            tokens = run(llm, attacks)
        stolen = [sock.poll(0) for sock in (pull, dealer)]
    finally:
        for sock in (rogue, pull, dealer):
            sock.close(linger=0)
        ctx.term()
    assert stolen == [0, 0], "a rogue connection to a plan port got a message"
    assert tokens == expected
    assert llm.engine.failure_stats() == stats, "a record that was dropped changed state"
    assert {w.rank: w.process.pid for w in ex.supervisor.workers} == pids
    assert ex.health() == (True, "ok")
    assert ex.channel.opener.dropped == 3
    assert any("dropped 1 control message(s) on driver" in r.getMessage()
               for r in caplog.records)  # fmt: skip

"""The control plane accepts only members (issue 22 item 2): frames signed with the cluster
secret (comm/auth), a per-sender sequence and a channel tag; forged, unsigned, replayed,
reordered-old and other-channel frames are dropped and logged, rate-limited, before decoding."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from types import SimpleNamespace

import pytest
import zmq

from afd.comm import auth, wire
from afd.comm.control import WorkerChannel
from afd.comm.messages import Abort, Ready, Shutdown

KEY = bytes(range(32))


def pair(tag: bytes = b"plan/0") -> tuple[auth.Sealer, auth.Opener]:
    return auth.Sealer(KEY), auth.Opener(tag, KEY)


def test_signed_frames_pass_in_order():
    sealer, opener = pair()
    frames = [sealer.seal(b"plan/0", b"payload %d" % i) for i in range(3)]
    assert [opener.open(f) for f in frames] == [b"payload 0", b"payload 1", b"payload 2"]
    assert opener.dropped == 0


@pytest.mark.parametrize(
    "case",
    ["unsigned", "short", "wrong key", "flipped payload", "other channel", "replayed", "old"],
)
def test_bad_frames_are_dropped(case):
    sealer, opener = pair()
    first, second = sealer.seal(b"plan/0", b"a"), sealer.seal(b"plan/0", b"b")
    frame = {
        "unsigned": wire.encode(Shutdown()),
        "short": b"\x00" * 10,
        "wrong key": auth.Sealer(bytes(32)).seal(b"plan/0", b"a"),
        "flipped payload": first[:-1] + b"z",
        "other channel": sealer.seal(b"plan/1", b"a"),
        "replayed": first,
        "old": first,
    }[case]
    if case in ("replayed", "old"):
        assert opener.open(first) == b"a"
        if case == "old":
            assert opener.open(second) == b"b"  # then the older one comes again
    assert opener.open(frame) is None
    assert opener.dropped == 1


def test_each_sender_has_its_own_sequence():
    a, opener = pair()
    b = auth.Sealer(KEY)
    assert opener.open(a.seal(b"plan/0", b"a1")) == b"a1"
    assert opener.open(b.seal(b"plan/0", b"b1")) == b"b1"  # a new sender starts its own count
    assert opener.open(a.seal(b"plan/0", b"a2")) == b"a2"


def test_drops_are_logged_rate_limited(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    _, opener = pair()
    with caplog.at_level(logging.WARNING, logger="afd.auth"):
        for _ in range(5):
            opener.open(b"junk")
        clock[0] += auth.LOG_EVERY_S
        opener.open(b"junk")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "dropped 1 control message(s) on plan/0" in lines[0]
    assert "dropped 5 control message(s)" in lines[1]  # the 4 held back and this one


@pytest.mark.parametrize(
    ("content", "error"),
    [(None, "cannot read"), ("", "is empty"), ("  \n", "is empty"), ("short", "at least 16")],
)
def test_secret_file_is_checked(tmp_path, content, error):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=error):
        auth.read_secret_file(str(path))


def test_secret_from_a_file_or_generated_reaches_children_by_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV, raising=False)
    auth.install_secret(None)
    generated = os.environ[auth.ENV]
    assert len(bytes.fromhex(generated)) == 32
    auth.install_secret(None)  # a child (or a second call) keeps the one it inherited
    assert os.environ[auth.ENV] == generated
    path = tmp_path / "secret"
    path.write_bytes(b"0123456789abcdef0123\n")
    auth.install_secret(str(path))
    assert auth.cluster_key() == b"0123456789abcdef0123"


def test_cli_rejects_a_bad_secret_file_and_nnodes_without_one(tmp_path, capsys):
    from afd.entrypoints.cli import main

    missing = str(tmp_path / "nope")
    assert main(["launch", "--cluster-secret-file", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot read --cluster-secret-file" in err
    assert main(["launch", "--nnodes", "2", "--dist-init-addr", "127.0.0.1:1"]) == 2
    assert "--nnodes > 1 needs --cluster-secret-file" in capsys.readouterr().err


@pytest.fixture
def worker_channel(monkeypatch):
    """A worker's channel and the driver's side of it (a bound PUSH, a bound PULL), over IPC."""
    monkeypatch.setenv(auth.ENV, KEY.hex())
    folder = tempfile.mkdtemp(prefix="afd-test-auth-")
    inbox, driver = f"ipc://{folder}/w0", f"ipc://{folder}/driver"
    ctx = zmq.Context()
    router, pull = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL)
    router.bind(inbox)
    pull.bind(driver)
    channel = WorkerChannel(SimpleNamespace(rank=0, inbox_addrs={0: inbox}, driver_addr=driver),
                            "attention")  # fmt: skip
    peer, hello = router.recv_multipart()
    assert auth.Opener(auth.hello_tag(0), KEY).open(hello) == b""  # its signed claim to rank 0

    def push(frame: bytes) -> None:
        router.send_multipart([peer, frame])

    try:
        yield channel, push, pull
    finally:
        channel.close()
        router.close(linger=0)
        pull.close(linger=0)
        ctx.term()
        shutil.rmtree(folder, ignore_errors=True)


def test_worker_takes_only_signed_new_driver_records(worker_channel, caplog):
    channel, push, _ = worker_channel
    driver = auth.Sealer(KEY)
    plan = driver.seal(auth.plan_tag(0), wire.encode(Abort(gen=3)))
    with caplog.at_level(logging.WARNING, logger="afd.auth"):
        push(wire.encode(Shutdown()))  # unsigned
        push(auth.Sealer(bytes(32)).seal(auth.plan_tag(0), wire.encode(Shutdown())))
        push(driver.seal(auth.plan_tag(1), wire.encode(Shutdown())))  # rank 1's
        push(plan)
        push(plan)  # replayed
        push(driver.seal(auth.plan_tag(0), wire.encode(Abort(gen=4))))
        assert channel.recv() == Abort(gen=3)
        assert channel.recv() == Abort(gen=4)
    assert channel.opener.dropped == 4
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_driver_takes_only_signed_new_worker_records(worker_channel):
    channel, _, pull = worker_channel
    opener = auth.Opener(auth.DRIVER_TAG, KEY)
    channel.send(Ready, role="attention", param_bytes=1, pid=1)
    real = pull.recv()
    assert wire.decode_from_worker(opener.open(real)).pid == 1
    forged = wire.encode(Ready(rank=0, inc=1, gen=-1, role="attention", param_bytes=1, pid=2))
    assert opener.open(forged) is None
    assert opener.open(real) is None  # replayed
    assert opener.open(auth.Sealer(KEY).seal(auth.plan_tag(0), forged)) is None  # a plan tag


def test_plans_go_only_to_the_connection_with_a_signed_hello(monkeypatch):
    """A rogue PULL (the issue's attack: PUSH dealt it every other plan) and a rogue DEALER
    with a forged hello connect to the plan port first; only the worker gets the plans."""
    from afd.scheduler.cluster.executor import DriverChannel

    monkeypatch.setenv(auth.ENV, KEY.hex())
    folder = tempfile.mkdtemp(prefix="afd-test-auth-")
    inbox, driver_addr = f"ipc://{folder}/w0", f"ipc://{folder}/driver"
    layout = SimpleNamespace(
        world_size=1, driver_addr=lambda: driver_addr, inbox_addr=lambda rank: inbox,
        role=lambda rank: "attention",
    )  # fmt: skip
    driver = DriverChannel(layout)
    driver.bind_outboxes()
    ctx = zmq.Context()
    pull, dealer = ctx.socket(zmq.PULL), ctx.socket(zmq.DEALER)
    for sock in (pull, dealer):
        sock.connect(inbox)
    dealer.send(auth.Sealer(bytes(32)).seal(auth.hello_tag(0), b""))
    spec = SimpleNamespace(rank=0, inbox_addrs={0: inbox}, driver_addr=driver_addr)
    channel = WorkerChannel(spec, "attention")
    try:
        for gen in range(4):
            driver.send(0, Abort(gen=gen))
        assert [channel.recv() for _ in range(4)] == [Abort(gen=g) for g in range(4)]
        assert pull.poll(200) == 0 and dealer.poll(0) == 0
        assert driver._hellos[0].dropped == 1  # the forged hello
    finally:
        for sock in (pull, dealer):
            sock.close(linger=0)
        ctx.term()
        channel.close()
        driver.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_plan_port_that_cannot_bind_fails_the_start_and_close_returns(monkeypatch):
    """A socket path over the IPC limit (a long TMPDIR) fails bind_outboxes; close must still
    return: it hung in Context.term on the socket whose bind had failed."""
    from afd.scheduler.cluster.executor import DriverChannel

    monkeypatch.setenv(auth.ENV, KEY.hex())
    folder = tempfile.mkdtemp(prefix="afd-test-auth-")
    layout = SimpleNamespace(
        world_size=1, driver_addr=lambda: f"ipc://{folder}/driver",
        inbox_addr=lambda rank: f"ipc://{folder}/{'x' * 200}", role=lambda rank: "attention",
    )  # fmt: skip
    driver = DriverChannel(layout)
    closer = threading.Thread(target=driver.close, daemon=True)
    try:
        driver.bind_outboxes()
    except zmq.ZMQError:  # closed while handling it, as the executor's start does
        closer.start()
        closer.join(timeout=10)
        hung = closer.is_alive()  # here: leaving the except frees the socket and unblocks it
    shutil.rmtree(folder, ignore_errors=True)
    assert closer.ident is not None, "the bind did not fail"
    assert not hung, "DriverChannel.close hung after a failed bind"

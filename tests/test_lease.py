"""Node 0's lease on the other nodes (scheduler/cluster/lease.py)."""

from __future__ import annotations

import socket

from afd.scheduler.cluster.lease import DriverLease


def test_lease_starts_at_first_answer_and_lapses_after_the_timeout():
    now = [0.0]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    lease = DriverLease("127.0.0.1", port, timeout_s=5.0, clock=lambda: now[0])
    assert lease.lapsed() is None  # node 0 not seen yet: no lease to lapse
    assert lease.probe()
    server.close()
    now[0] = 4.0
    assert not lease.probe() and lease.lapsed() is None  # silent, but within the timeout
    now[0] = 6.5
    assert not lease.probe() and lease.lapsed() == 6.5

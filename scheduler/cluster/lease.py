"""Node 0's lease on the other nodes: a node > 0 keeps its workers only while node 0's
rendezvous port (the TCP store every generation meets at) accepts connections."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

PROBE_TIMEOUT_S = 1.0  # one connection attempt; a lost host does not refuse, it is silent


class DriverLease:
    """Whether node 0 still answers at `host:port`; the lease lapses `timeout_s` after its
    last answer. It starts at the first answer: node 0 may start after this node."""

    def __init__(
        self, host: str, port: int, timeout_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.host, self.port, self.timeout_s, self.clock = host, port, timeout_s, clock
        self.last_seen: float | None = None

    def probe(self) -> bool:
        """Connect once to node 0 (and close at once); True if it answered."""
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError:
            return False
        self.last_seen = self.clock()
        return True

    def lapsed(self) -> float | None:
        """Seconds since node 0 last answered, once past timeout_s; None while it holds."""
        if self.last_seen is None:
            return None
        silent = self.clock() - self.last_seen
        return silent if silent > self.timeout_s else None

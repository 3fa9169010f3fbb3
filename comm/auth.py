"""The cluster secret and signed control-plane frames. Every record between the driver and its
workers travels as HMAC-SHA256(secret, tag | sender | seq | payload) | sender | seq | payload:
`tag` names the channel (a plan for rank 1 cannot be replayed to rank 0 or to the driver),
`sender` is random per sending process and `seq` rises with each frame, so a receiver drops
forged, unsigned and replayed (or reordered-old) frames before it decodes them.

The secret reaches child processes in the environment ($AFD_CLUSTER_SECRET, hex), never on a
command line `ps` shows."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import secrets
import struct
import threading
import time

ENV = "AFD_CLUSTER_SECRET"
MIN_SECRET_BYTES = 16
_MAC = 32
_HEAD = struct.Struct("<8sQ")  # sender, seq
_FRAME = _MAC + _HEAD.size
_MAX_SENDERS = 4096  # per receiver; the oldest is forgotten past this
LOG_EVERY_S = 10.0

log = logging.getLogger("afd.auth")


def read_secret_file(path: str) -> bytes:
    """The secret in `path` (its bytes, surrounding whitespace stripped); ValueError naming the
    flag when it is missing, unreadable, empty or shorter than 16 bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 16).strip()
    except OSError as e:
        raise ValueError(f"cannot read --cluster-secret-file {path}: {e.strerror or e}") from None
    if not raw:
        raise ValueError(f"--cluster-secret-file {path} is empty")
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(
            f"--cluster-secret-file {path} holds {len(raw)} bytes; use at least "
            f"{MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | xxd -p > {path}`)"
        )
    return raw


def install_secret(path: str | None) -> None:
    """Put the cluster's secret in this process's environment, for it and every child: from
    `path`, else the one already there (a parent's), else a new one (one node)."""
    if path is not None:
        os.environ[ENV] = read_secret_file(path).hex()
    elif not os.environ.get(ENV):
        os.environ[ENV] = secrets.token_bytes(32).hex()


def cluster_key() -> bytes:
    """This process's cluster secret (installed on first use when there is none)."""
    install_secret(None)
    try:
        return bytes.fromhex(os.environ[ENV])
    except ValueError:
        raise ValueError(f"${ENV} is not hex") from None


class Sealer:
    """Signs the frames one process sends (one sender id, one rising sequence)."""

    def __init__(self, key: bytes | None = None):
        self._key = cluster_key() if key is None else key
        self._sender = secrets.token_bytes(8)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def seal(self, tag: bytes, payload: bytes) -> bytes:
        with self._lock:
            head = _HEAD.pack(self._sender, next(self._seq))
        mac = hmac.new(self._key, tag + b"\0" + head, hashlib.sha256)
        mac.update(payload)
        return mac.digest() + head + payload


class Opener:
    """Checks the frames one receiver takes on channel `tag`: the payload of a well-signed frame
    newer than the last from its sender, else None (and a log line, at most one per 10 s)."""

    def __init__(self, tag: bytes, key: bytes | None = None):
        self.tag = tag
        self._key = cluster_key() if key is None else key
        self._last: dict[bytes, int] = {}
        self.dropped = 0
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    def open(self, frame: bytes) -> bytes | None:
        if len(frame) < _FRAME:
            return self._drop("unsigned (too short)")
        head, payload = frame[_MAC:_FRAME], frame[_FRAME:]
        mac = hmac.new(self._key, self.tag + b"\0" + head, hashlib.sha256)
        mac.update(payload)
        if not hmac.compare_digest(mac.digest(), frame[:_MAC]):
            return self._drop("bad signature (forged, unsigned or another channel's)")
        sender, seq = _HEAD.unpack(head)
        if seq <= self._last.get(sender, 0):
            return self._drop(f"replayed or old (seq {seq})")
        self._last.pop(sender, None)  # re-insert: the dict's order is least recently heard
        self._last[sender] = seq
        if len(self._last) > _MAX_SENDERS:
            del self._last[next(iter(self._last))]
        return payload

    def _drop(self, why: str) -> None:
        self.dropped += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "afd: dropped %d control message(s) on %s: %s",
                self._unlogged, self.tag.decode(errors="replace"), why,
            )  # fmt: skip
            self._logged_at, self._unlogged = now, 0
        return None


DRIVER_TAG = b"driver"


def plan_tag(rank: int) -> bytes:
    """The channel tag of worker `rank`'s plan port."""
    return b"plan/%d" % rank


def hello_tag(rank: int) -> bytes:
    """The channel tag of worker `rank`'s hello on its plan port (its claim to the port)."""
    return b"hello/%d" % rank

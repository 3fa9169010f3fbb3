"""The cluster secret, the key control-plane records are signed with. It reaches child
processes in the environment ($AFD_CLUSTER_SECRET, hex), never on a command line `ps` shows."""

from __future__ import annotations

import os
import secrets

ENV = "AFD_CLUSTER_SECRET"
MIN_SECRET_BYTES = 16


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

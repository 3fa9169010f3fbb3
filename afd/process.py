"""What every AFD process (launcher, API server, engine core) sets up the same way: its loggers
and SIGTERM. Below afd.engine and afd.entrypoints, so that both can import it."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record comes (not when made)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(level: str) -> None:
    """AFD's loggers to stderr at `level`."""
    log = logging.getLogger("afd")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level.upper())


def raise_interrupt(signum, frame) -> None:
    """A SIGTERM handler: unwind as Ctrl-C does, so finally blocks clean up."""
    raise KeyboardInterrupt

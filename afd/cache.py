"""Where AFD keeps what it builds once per machine (models, compiled kernels). A leaf module:
the kernels and the built-in models both use it without importing each other."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of AFD's cache: `$AFD_CACHE_DIR` or `~/.cache/afd`."""
    return Path(os.environ.get("AFD_CACHE_DIR") or Path.home() / ".cache" / "afd").expanduser()

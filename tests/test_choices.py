"""The flags' choice lists (afd.choices) agree with the registries, and parsing `afd serve`
imports no torch (the launcher's start-up, issue 20)."""

from __future__ import annotations

import subprocess
import sys

import torch

from afd.choices import DISPATCH_DTYPES, DTYPE_NAMES, KERNEL_BACKENDS, TRANSPORTS
from afd.comm import dispatch
from afd.kernels import ops


def test_choice_constants_match_the_registries() -> None:
    assert list(TRANSPORTS) == dispatch.transport_names()
    assert dispatch.DISPATCH_DTYPES == DISPATCH_DTYPES
    assert ops.KERNEL_BACKENDS == KERNEL_BACKENDS
    before = ops.get_kernel_backend()
    try:
        for name in KERNEL_BACKENDS:
            ops.set_kernel_backend(name)
            assert ops.get_kernel_backend() == name
    finally:
        ops.set_kernel_backend(before)
    assert all(isinstance(getattr(torch, n), torch.dtype) for n in DTYPE_NAMES)


_PARSE_SERVE = """
import contextlib, io, sys
from afd.entrypoints.cli import build_parser, main, engine_config_from_args
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["serve", "--help"])
args = build_parser("serve").parse_args(["serve", "m", "--num-attention-workers", "1"])
engine_config_from_args(args)
print(sorted(m for m in ("torch", "numpy") if m in sys.modules))
"""


def test_serve_flags_parse_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PARSE_SERVE], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

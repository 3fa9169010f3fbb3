"""The choice lists of the engine flags as plain constants, so that parsing `afd serve` flags
and launching the engine core import no torch (~2 s); the registries they name import torch,
and tests/test_choices.py checks that both agree."""

from __future__ import annotations

KERNEL_BACKENDS = ("auto", "torch", "cpu", "triton")
# the built-in A<->F transports (afd.comm.dispatch registers them; more may be registered)
TRANSPORTS = ("auto", "deepep", "shm", "torch")
DISPATCH_DTYPES = ("auto", "fp8")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

from __future__ import annotations

import os

# Must be set before any @triton.jit is defined (Triton reads it at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

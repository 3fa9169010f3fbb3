"""`afd bench steps`' per-component row from py-spy's raw samples (the folding itself is
test_profile_serve's)."""

from __future__ import annotations

import pytest

from afd.benchmarks.profile_serve import fold, parse_raw
from afd.benchmarks.profile_steps import summary_row

RAW = """\
step (afd/engine/llm_engine.py:10);fused_moe (kernels/cpu_ops.py:50) 6
step (afd/engine/llm_engine.py:10);paged_attention (kernels/cpu_ops.py:90) 2
step (afd/engine/llm_engine.py:10);forward (torch/nn/modules/linear.py:1) 1
step (afd/engine/llm_engine.py:10) 1
"""


def test_summary_row_shares():
    run = {"tokens_per_s": 100.0, **fold(parse_raw(RAW))}
    row = summary_row("m", "decode-16", run)
    assert row["moe"] == pytest.approx(0.6)
    assert row["attention"] == pytest.approx(0.2)
    assert row["dense"] == pytest.approx(0.1)
    assert row["sampling"] == 0.0
    assert row["host"] == pytest.approx(0.1)  # the engine loop, and whatever the layers are not

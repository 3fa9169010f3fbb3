"""`afd bench steps`' per-component row from py-spy's raw samples (the folding itself is
test_profile_serve's)."""

from __future__ import annotations

import pytest

from afd.benchmarks.profile_serve import fold, parse_raw
from afd.benchmarks.profile_steps import summary_row, thread_samples

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


def test_host_time_per_step_from_the_share_and_the_steps():
    run = {"tokens_per_s": 100.0, "generate_s": 2.0, "steps": 100, **fold(parse_raw(RAW))}
    row = summary_row("m", "decode-64", run)
    assert row["step_ms"] == pytest.approx(20.0)
    assert row["host_ms_per_step"] == pytest.approx(2.0)  # 10% of a 20 ms step


def test_only_the_engine_thread_is_folded():
    raw = (
        'process 7:"python";thread (7): MainThread;step (afd/engine/llm_engine.py:10);'
        "fused_moe (kernels/cpu_ops.py:50) 3\n"
        'process 7:"python";thread (9): tqdm_monitor;wait (threading.py:320) 5\n'
    )
    samples = parse_raw(raw)
    assert sum(s.count for s in thread_samples(samples, 7)) == 3
    assert summary_row("m", "p", {"tokens_per_s": 1.0, **fold(thread_samples(samples, 7))})[
        "moe"
    ] == pytest.approx(1.0)
    # a py-spy that labels threads some other way: every sample is kept
    assert thread_samples(samples, 12345) == samples

"""`afd profile --quick` end to end as a user runs it (every part: layers at both thread counts,
transfers and interference between two processes, host time of the real engine with the
driver's plan messages, prefill), then its JSON fed to `afd plan --predict` and `afd plan`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from afd.scheduler.planner import planner
from afd.scheduler.planner.profiler import FEATURES, MeasuredCosts
from afd.scheduler.planner.step_model import StepConfig, layer_kinds, predict

MODEL = "tiny-qwen3-moe"  # has dense and MoE layers: every fit is taken
FITS = {
    "attention_moe": "attention", "attention_dense": "attention", "sample": "sample",
    "expert": "expert", "prep": "prep", "transfer_dispatch": "transfer",
    "transfer_combine": "transfer", "transfer_link": "transfer", "host": "host",
    "plan": "plan", "prefill": "prefill",
}  # fmt: skip


def afd(*argv: str, timeout: float) -> str:
    """Run `python -m afd ARGV` and return its stdout; a non-zero exit fails with its stderr."""
    r = subprocess.run([sys.executable, "-m", "afd", *argv], capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode == 0, f"afd {' '.join(argv)} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("profile") / "p.json"
    out = afd("profile", "--model", MODEL, "--quick", "--output", str(path), timeout=600)
    assert f"wrote {path}" in out
    return str(path)


@pytest.mark.slow
def test_every_part_is_measured_and_fitted(profile):
    prof = json.loads(open(profile).read())
    assert prof["model"] == MODEL and "commit" in prof and prof["command"].startswith("afd profile")
    fits = prof["fits"]
    want = {*FITS, *(f"{k}_mt" for k in ("attention_moe", "attention_dense", "sample", "expert"))}
    assert want <= set(fits)
    for name, f in fits.items():
        kind = FITS[name.removesuffix("_mt")]
        assert f["features"] == list(FEATURES[kind]), name
        assert f["points"] and all(c >= 0 for c in f["coef"]), name
        # the link is what a round trip spends beyond both copies, clamped at 0: on loopback
        # shared memory that can be all of it
        low = 0 if name == "transfer_link" else 1e-12
        assert all(low <= p["seconds"] < 10 for p in f["points"]), name
        assert name == "transfer_link" or any(c > 0 for c in f["coef"]), name
    # host time: the engine's step at each batch; plan messages at each (batch, context)
    assert [p["batch"] for p in fits["host"]["points"]] == [8, 64, 256]
    assert len(fits["plan"]["points"]) == 6
    # transfers over the transport the cluster resolves here, at four sizes
    assert prof["comm_backend"] in ("shm", "torch")
    assert len(fits["transfer_dispatch"]["points"]) == 4
    inter = prof["interference"]
    assert inter["attention"] >= 1 and inter["expert"] >= 1
    assert all(s > 0 for pair in inter["raw"].values() for s in pair)


@pytest.mark.slow
def test_plan_predict_from_the_profile(profile):
    argv = ["plan", "--profile", profile, "--predict", "--num-attention-workers", "1",
            "--num-expert-workers", "1", "--num-micro-batches", "2", "--batch-size", "32",
            "--context-len", "128", "--num-scheduler-steps", "4", "--json"]  # fmt: skip
    got = json.loads(afd(*argv, timeout=120))
    costs = MeasuredCosts.load(profile)
    cfg = StepConfig(micro_batches=2, batch=32, context=128.0, scheduler_steps=4)
    want = predict(costs, cfg)
    assert got["decode_tokens_per_s"] == pytest.approx(want.decode_tokens_per_s)
    step = got["step_time_s"]
    assert math.isfinite(step) and step > 0
    assert got["decode_tokens_per_s"] == pytest.approx(32 / step)
    # the attention worker's busy time per decode step holds at least every layer's attention
    # side for both micro-batches of 16, from the fits; the step is at least that busy time
    shape = costs.shape
    attention = sum(costs.attention_layer(moe, 16, 128.0) for moe in layer_kinds(shape)) * 2
    assert attention <= got["stages_s"]["attention"] * (1 + 1e-9) <= step * (1 + 1e-9)
    # the scheduling step (K decode steps) includes the host part and the plan messages
    assert got["scheduling_step_s"] >= costs.host(32, disaggregated=True, context=128.0)
    assert got["scheduling_step_s"] == pytest.approx(4 * step)


@pytest.mark.slow
def test_plan_yaml_from_the_profile(profile, tmp_path):
    out_yaml = tmp_path / "plan.yaml"
    argv = ["plan", "--model", MODEL, "--profile", profile, "--input-len", "64",
            "--output-len", "64", "--ttft-ms", "60000", "--tpot-ms", "1000", "--max-workers", "2",
            "--output", str(out_yaml)]  # fmt: skip
    out = afd(*argv, timeout=120)
    assert f"wrote {out_yaml}" in out
    settings = yaml.safe_load(out_yaml.read_text())
    # the YAML is the planner's best candidate for this profile, computed here again
    req = planner.PlanRequest(input_len=64, output_len=64, ttft_ms=60000.0, tpot_ms=1000.0,
                              max_workers=2)  # fmt: skip
    best = next(c for c in planner.search(MeasuredCosts.load(profile), req) if c.meets_slo)
    c = best.config
    assert settings["model"] == MODEL and settings["device"] == "cpu"
    afd_kind = c.kind == "afd"
    assert settings["num-attention-workers"] == (c.attention_workers if afd_kind else 0)
    assert settings["num-expert-workers"] == (c.expert_workers if afd_kind else 0)
    assert settings["num-micro-batches"] == c.micro_batches
    assert settings["num-scheduler-steps"] == c.scheduler_steps
    assert settings["max-num-seqs"] == c.total_batch >= 1
    assert 0 < best.prediction.tpot_ms <= 1000

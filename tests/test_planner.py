"""The planner: step model by exact arithmetic on synthetic costs, presets, fits, plan search,
the plan YAML that afd launch starts, and the CLI's error lines."""

from __future__ import annotations

import json
import math

import pytest

from afd.entrypoints.cli import main
from afd.scheduler.planner import planner
from afd.scheduler.planner.hardware import PRESETS, RooflineCosts, calibrate, get_preset
from afd.scheduler.planner.profiler import MeasuredCosts, evaluate, features, fit
from afd.scheduler.planner.published import POINTS, reproduce
from afd.scheduler.planner.step_model import (
    ModelShape,
    StepConfig,
    active_experts,
    expert_fraction,
    predict,
    split_sizes,
    ttft,
)

SHAPE = ModelShape(
    name="synthetic", hidden=4, layers=2, moe_layers=2, vocab=8, experts=4, top_k=1,
    moe_intermediate=4, shared_intermediate=0, dense_intermediate=0, attention="gqa",
    q_heads=1, kv_heads=1, head_dim=4,
)  # fmt: skip


class Synthetic:
    """Costs with round numbers: attention a per layer, experts e per layer, each transfer
    costs `send` on the sender's thread and `link` on the wire; no interference by default."""

    device = "cpu"
    cores = 8
    act_bytes = weight_bytes = kv_bytes = 1
    memory_per_worker = 1e12

    def __init__(self, a=4.0, e=4.0, send=0.0, link=0.0, host=0.0, sample=0.0, inter=(1, 1)):
        self.shape, self.a, self.e, self.send, self.link = SHAPE, a, e, send, link
        self.h, self.s, self.interference = host, sample, inter

    def attention_layer(self, moe, batch, context):
        return self.a * batch  # proportional: splitting the batch keeps the total

    def expert_layer(self, pairs, active, held):
        return self.e * pairs

    def sample(self, batch):
        return self.s

    def prep(self, batch, context):
        return 0.0

    def transfer(self, nbytes, direction):
        return self.send, self.link, 0.0

    def host(self, batch, disaggregated, context):
        return self.h

    def colocated_step(self, batch, context):
        return None

    def prefill(self, tokens):
        return 0.01 * tokens


def cfg(**kw) -> StepConfig:
    base = dict(kind="afd", attention_workers=1, expert_workers=1, batch=1, context=8.0)
    return StepConfig(**{**base, **kw})


def test_m1_is_the_sum_of_both_sides_on_every_layer():
    # batch 1, 2 MoE layers: attention 4, experts 4 per layer, nothing overlaps
    p = predict(Synthetic(), cfg(micro_batches=1))
    assert p.step_time_s == 16.0
    assert p.decode_tokens_per_s == 1 / 16
    assert p.bubble_fraction == {"attention": 0.5, "expert": 0.5}
    assert p.stages_s["attention"] == 8.0 and p.stages_s["expert"] == 8.0


def test_two_micro_batches_overlap_the_sides():
    # batch 2 in two micro-batches of 1: A0 0-4, A1 4-8, F0 4-8, F1 8-12, A0(L1) 8-12,
    # A1(L1) 12-16, F0(L1) 12-16, F1(L1) 16-20: the step ends at 20 instead of 32
    s = Synthetic()
    assert predict(s, cfg(batch=2, micro_batches=1)).step_time_s == 32.0
    p = predict(s, cfg(batch=2, micro_batches=2))
    assert p.step_time_s == 20.0
    assert p.bubble_fraction["attention"] == pytest.approx(1 - 16 / 20)


def test_unequal_sides_take_the_slower_one_per_layer_plus_fill():
    # attention 2, experts 6 per token: with two micro-batches the expert side paces the
    # step: A0 0-2, A1 2-4, F0 2-8, F1 8-14; layer 1: A0 8-10, F0 14-20 (after F1),
    # A1 14-16, F1 20-26
    p = predict(Synthetic(a=2.0, e=6.0), cfg(batch=2, micro_batches=2))
    assert p.step_time_s == 26.0
    assert p.bottleneck == "expert"
    assert p.bubble_fraction["expert"] == pytest.approx(1 - 24 / 26)


def test_transfers_host_and_multi_step_scheduling():
    # links of 1 each way: m = 1 adds 2 per layer; host 8 per scheduling step
    s = Synthetic(link=1.0, host=8.0)
    assert predict(s, cfg()).step_time_s == 16 + 4 + 8
    p = predict(s, cfg(scheduler_steps=4))
    # K = 4 decode steps back to back (layer 0 of step k waits for layer 1's combine of step
    # k-1), one host time: (4 * 20 + 8) / 4
    assert p.step_time_s == (4 * 20 + 8) / 4
    assert p.scheduling_step_s == 88.0
    assert p.exposed_comm_s == 4.0  # free transfers: 16 per decode step instead of 20


def test_sender_copies_are_on_the_senders_thread():
    # send cost 1: attention op 4 + 1, expert op 4 + 1 (its combine send): 2 layers x 10
    assert predict(Synthetic(send=1.0), cfg()).step_time_s == 20.0


def test_interference_stretches_only_overlapped_work():
    # m = 1: the sides never run at once, a slowdown changes nothing
    slow = Synthetic(inter=(1.5, 1.5))
    assert predict(slow, cfg()).step_time_s == 16.0
    # m = 2, a = e = 4: some of each op overlaps the other side, so the step grows, but by
    # less than the full slowdown of every op
    fast = predict(Synthetic(), cfg(batch=2, micro_batches=2)).step_time_s
    slowed = predict(slow, cfg(batch=2, micro_batches=2)).step_time_s
    assert fast < slowed < fast * 1.5


def test_colocated_sums_layers_and_amortises_host():
    s = Synthetic(host=8.0, sample=1.0)
    # per decode step: 2 layers x (4 + 4) + sample 1 = 17; host 8 over K steps
    assert predict(s, StepConfig(kind="colocated", batch=1)).step_time_s == 25.0
    assert predict(s, StepConfig(kind="colocated", batch=1, scheduler_steps=4)).step_time_s == 19.0


def test_ep_runs_both_sides_on_one_gpu():
    # one "gpu" resource: attention 4 then experts 4 per layer and micro-batch, no overlap
    # without transfers: 2 layers x 2 micro-batches x 8 = 32 for batch 2
    p = predict(Synthetic(), StepConfig(kind="ep", attention_workers=2, micro_batches=2,
                                        batch=2, context=8.0))  # fmt: skip
    assert p.step_time_s == 32.0
    assert p.config.workers == 2


def test_helpers():
    assert split_sizes(7, 3) == [3, 2, 2]
    assert expert_fraction(4, 1, 1) == 0.25
    assert expert_fraction(8, 2, 4) == 1 - math.comb(4, 2) / math.comb(8, 2)
    assert expert_fraction(4, 2, 4) == 1.0
    assert active_experts(4, 4, 1, 0) == 0.0
    assert active_experts(4, 4, 1, 1) == pytest.approx(1.0)


def test_ttft_is_md1_and_infinite_past_saturation():
    s = Synthetic()
    # prefill 1 s for 100 tokens, one worker at 0.5 req/s: 1 + 0.5 * 1 / (2 * 0.5) = 1.5
    t, rho = ttft(s, 100, 0.5, 1)
    assert rho == 0.5 and t == 1.5
    assert ttft(s, 100, 1.0, 1)[0] == math.inf


def test_step_config_rejects_bad_values():
    for bad in (dict(batch=0), dict(micro_batches=0), dict(batch=2, micro_batches=3),
                dict(context=float("nan")), dict(context=0), dict(kind="pp"),
                dict(expert_workers=0), dict(batch=2**64 + 0.5)):  # fmt: skip
        with pytest.raises(ValueError):
            cfg(**bad)


def test_fit_recovers_linear_costs_exactly():
    pts = [{"batch": b, "context": c, "seconds": 1e-3 + 2e-5 * b + 1e-6 * c + 3e-8 * b * c}
           for b in (8, 32, 128) for c in (64, 512)]  # fmt: skip
    f = fit("attention", pts)
    assert f["coef"] == pytest.approx([1e-3, 2e-5, 1e-6, 3e-8], rel=1e-6)
    assert evaluate(f, "attention", batch=64, context=100) == pytest.approx(
        1e-3 + 2e-5 * 64 + 1e-4 + 3e-8 * 6400
    )
    assert features("prefill", tokens=3) == [1.0, 3.0, 9.0]


def test_roofline_arithmetic_and_presets():
    hw = get_preset("h100")
    assert get_preset("H100") is hw and set(PRESETS) >= {"H100", "H200", "H800", "H20", "A100",
                                                         "A800", "L40S", "B200"}  # fmt: skip
    costs = RooflineCosts(SHAPE, hw, "bf16", "bf16", workers=2)
    e = hw.efficiency
    # experts: 8 pairs of 3*4*4 params, compute-bound against memory of 1 active expert
    flops = 2 * 8 * 48 / (hw.bf16_tflops * 1e12 * e.matmul)
    mem = 1 * 48 * 2 / (hw.hbm_gbps * 1e9 * e.memory)
    assert costs.expert_layer(8, 1, 4) == pytest.approx(e.expert_overhead_s + max(flops, mem))
    assert costs.transfer(1e9, "dispatch")[1] == pytest.approx(
        e.link_latency_s + 1e9 / (hw.nvlink_gbps * 1e9 * e.link)
    )
    assert RooflineCosts(SHAPE, hw, workers=16).link == hw.nic_gbps * 1e9 * e.link
    with pytest.raises(ValueError):
        get_preset("tpu")
    with pytest.raises(ValueError):
        hw.efficiency.with_overrides({"memory": 1.5})


def test_calibrate_from_bench_kernels(tmp_path):
    report = {"device_type": "cuda", "results": [
        {"kernel": "paged_attention", "GBps": 2000.0},
        {"kernel": "paged_attention", "GBps": 2680.0},
        {"kernel": "paged_attention", "GBps": 3000.0},
        {"kernel": "fused_moe", "TFLOPs": 130.0, "GBps": 1.0}]}  # fmt: skip
    path = tmp_path / "k.json"
    path.write_text(json.dumps(report))
    hw = calibrate(get_preset("H100"), path)
    assert hw.efficiency.memory == pytest.approx(2680 / 3350)
    assert hw.efficiency.matmul == pytest.approx(130 / 989)
    path.write_text(json.dumps({**report, "device_type": "cpu"}))
    with pytest.raises(ValueError):
        calibrate(get_preset("H100"), path)


def test_published_points_are_reproduced_within_25_percent():
    rows = reproduce()
    assert len(rows) == len(POINTS)
    for r in rows:
        assert abs(r["residual"]) <= 0.25, r["name"]


def _profile(tmp_path) -> str:
    """A profile of SHAPE's model with round coefficients (what afd profile writes)."""

    def f(kind, coef):
        return {"features": [], "coef": coef, "max_rel_error": 0.0, "points": []}

    fits = {
        "attention_moe": f("attention", [1e-3, 1e-5, 0.0, 0.0]),
        "attention_moe_mt": f("attention", [1e-3, 5e-6, 0.0, 0.0]),
        "expert": f("expert", [1e-3, 0.0, 1e-5]),
        "expert_mt": f("expert", [1e-3, 0.0, 5e-6]),
        "sample": f("sample", [1e-4, 0.0]), "sample_mt": f("sample", [1e-4, 0.0]),
        "prep": f("prep", [0.0, 0.0, 0.0]),
        "transfer_dispatch": f("transfer", [1e-4, 0.0]),
        "transfer_combine": f("transfer", [1e-4, 0.0]),
        "transfer_link": f("transfer", [0.0, 0.0]),
        "host": f("host", [1e-3, 0.0]), "plan": f("plan", [1e-3, 0.0, 0.0]),
        "prefill": f("prefill", [1e-2, 1e-4, 0.0]),
    }  # fmt: skip
    from dataclasses import asdict

    prof = {"profile_version": 1, "model": "tiny-qwen3-moe", "shape": asdict(SHAPE),
            "cores": 2, "interference": {"attention": 1.0, "expert": 1.0}, "act_bytes": 4,
            "memory_bytes": 2**34, "fits": fits}  # fmt: skip
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    return str(path)


def test_measured_costs_and_colocated_from_a_profile(tmp_path):
    costs = MeasuredCosts.load(_profile(tmp_path))
    # colocated, batch 10: per layer attention 1e-3 + 5e-5, experts 1e-3 + 10 pairs * 5e-6;
    # plus sampling 1e-4
    want = 2 * (1.05e-3 + 1.05e-3) + 1e-4
    assert costs.colocated_step(10, 64) == pytest.approx(want)
    p = predict(costs, StepConfig(kind="colocated", batch=10, context=64.0))
    assert p.step_time_s == pytest.approx(want + 1e-3)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError):
        MeasuredCosts.load(bad)


def test_plan_search_picks_the_fastest_under_the_slo(tmp_path):
    costs = MeasuredCosts.load(_profile(tmp_path))
    req = planner.PlanRequest(input_len=16, output_len=16, ttft_ms=1e4, tpot_ms=20.0,
                              max_workers=2)  # fmt: skip
    cands = planner.search(costs, req)
    assert cands[0].meets_slo
    assert all(c.prediction.tpot_ms <= 20.0 for c in cands if c.meets_slo)
    tps = [c.tokens_per_s for c in cands if c.meets_slo]
    assert tps == sorted(tps, reverse=True)
    # twice the chosen batch breaks the SLO (the search went to the edge)
    best = cands[0]
    c = best.config
    double = StepConfig(
        kind=c.kind,
        expert_workers=c.expert_workers,
        batch=c.batch * 2,
        micro_batches=c.micro_batches,
        scheduler_steps=c.scheduler_steps,
        context=req.mean_context,
    )
    over = planner._evaluate(costs, req, double, slots=0)  # TPOT with its share of prefill
    assert over.prediction.tpot_ms > 20.0


def test_plan_cli_errors(capsys, tmp_path):
    prof = _profile(tmp_path)
    step3 = ["plan", "--hardware", "H100", "--model", "step3"]
    one_line = [
        ["plan", "--model", "tiny-qwen3-moe"],  # neither a profile nor a preset
        ["plan", "--profile", prof, "--predict", "--num-attention-workers", "-1"],
        ["plan", "--profile", str(tmp_path / "none.json")],
        [*step3, "--efficiency", "memory=2"],
        [*step3, "--efficiency", "\udcff=1"],
        [*step3, "--tpot-ms", "0.001", "--output", str(tmp_path / "x.yaml")],  # nothing fits
    ]
    for argv in one_line:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("afd: error:"), (argv, err)
    # argparse refuses these before anything runs (one line too, exit 2)
    for extra in (["--tpot-ms", "nan"], ["--max-workers", "0"], ["--input-len", str(2**64)],
                  ["--hardware", "TPU9"], ["--request-rate", "-1"]):  # fmt: skip
        assert main([*step3, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("afd: error: argument") and err.count("\n") == 1, err


def test_predict_json_and_published_cli(capsys, tmp_path):
    prof = _profile(tmp_path)
    argv = ["plan", "--profile", prof, "--predict", "--num-micro-batches", "2", "--batch-size",
            "8", "--context-len", "64", "--num-scheduler-steps", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("decode_tokens_per_s", "step_time_s", "tpot_ms", "stages_s", "bubble_fraction"):
        assert key in out
    one = StepConfig(micro_batches=2, batch=8, context=64.0, scheduler_steps=4)
    direct = predict(MeasuredCosts.load(prof), one)
    assert out["decode_tokens_per_s"] == pytest.approx(direct.decode_tokens_per_s)
    assert main(["plan", "--published", "--output", str(tmp_path / "pub.json")]) == 0
    pub = json.loads((tmp_path / "pub.json").read_text())
    assert pub["command"].startswith("afd") and len(pub["points"]) == len(POINTS)


@pytest.mark.slow
def test_plan_yaml_starts_with_afd_launch(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import yaml

    # a machine where one process is slow with every core (colocated loses) and two workers
    # overlap well: the plan must be disaggregated
    prof = json.loads(open(_profile(tmp_path)).read())
    prof["fits"]["attention_moe_mt"]["coef"] = [1e-2, 1e-3, 0.0, 0.0]
    path = tmp_path / "slow-colocated.json"
    path.write_text(json.dumps(prof))
    plan = tmp_path / "plan.yaml"
    argv = ["plan", "--profile", str(path), "--model", "tiny-qwen3-moe", "--input-len", "16",
            "--output-len", "16", "--tpot-ms", "50", "--max-workers", "2",
            "--output", str(plan), "--frontier", str(tmp_path / "frontier.png")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1A1F" in out and (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    settings = yaml.safe_load(plan.read_text())
    assert settings["num-attention-workers"] == 1 and settings["num-expert-workers"] == 1
    with socket_port() as port:
        proc = subprocess.Popen(
            [sys.executable, "-m", "afd", "launch", "--config", str(plan), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        body = {"model": "tiny-qwen3-moe", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", timeout=60, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert "1 attention worker(s)" in out and f"m={settings['num-micro-batches']}" in out


class socket_port:
    """A free TCP port on 127.0.0.1 (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.slow
def test_bench_pipeline_predicts_every_row_and_measures_colocated(tmp_path, capsys):
    prof = _profile(tmp_path)
    argv = [
        "bench",
        "pipeline",
        "--model",
        "tiny-qwen3-moe",
        "--batch-size",
        "4",
        "--context-len",
        "5",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--max-micro-batches",
        "2",
        "--num-scheduler-steps",
        "1,2",
        "--profile",
        prof,
        "--output-dir",
        str(tmp_path),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "pipeline.json").read_text())
    costs = MeasuredCosts.load(prof)
    ctx = result["runs"][0]["predicted"]["context"]
    for r in result["runs"]:
        want = predict(costs, StepConfig(micro_batches=r["m"], batch=4, context=ctx,
                                         scheduler_steps=r["num_scheduler_steps"]))  # fmt: skip
        assert r["predicted"]["decode_tokens_per_s"] == pytest.approx(want.decode_tokens_per_s)
        assert r["prediction_error"] == pytest.approx(
            want.decode_tokens_per_s / r["decode_tokens_per_s"] - 1
        )
    assert [c["num_scheduler_steps"] for c in result["colocated"]] == [1, 2]
    assert all(c["decode_tokens_per_s"] > 0 and "predicted" in c for c in result["colocated"])
    assert "colocated" in capsys.readouterr().out

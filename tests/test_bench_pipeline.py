"""`afd bench pipeline`: the metric formulas on exact synthetic times, and one run end to end on a
tiny model that measures every (K, m) side by side."""

from __future__ import annotations

import json

import pytest

from afd.benchmarks import pipeline
from afd.builtin import resolve_model
from afd.config import ModelConfig
from afd.entrypoints.cli import main
from afd.results import machine_name


def _stage_sums(per_step: dict[str, float], steps: int) -> dict[str, float]:
    return {name: v * steps for name, v in per_step.items()}


def test_summarise_exact_values():
    """Two scheduling steps of K = 2 (4 decode steps, 0.5 s each); 2 attention workers and one
    expert worker; stage seconds per decode step summed over each side's workers."""
    per_step = {
        "attention_plan": 0.8,
        "attention": 0.5,  # timed compute; the plan residual is what counts
        "dispatch": 0.04,
        "combine_copy": 0.02,
        "combine_wait": 0.2,
        "expert_plan": 0.45,
        "expert": 0.24,
        "expert_recv_copy": 0.01,
        "expert_send": 0.04,
        "expert_recv_wait": 0.15,
    }
    loads = [[[4, 2]], [[2, 0]]]  # per scheduling step, per expert worker, tokens per expert
    r = pipeline.summarise(
        [0.8, 1.2],
        _stage_sums(per_step, 4),
        loads,
        {"dispatch": 4000, "combine": 3000},
        m=2,
        k=2,
        num_attention=2,
        num_expert=1,
        total=64,
    )
    approx = pytest.approx
    assert r["step_time_s"] == approx(0.5)
    assert r["step_time_median_s"] == approx(0.5)
    assert r["decode_tokens_per_s"] == approx(128.0)
    a, f = r["attention"], r["expert"]
    # attention: plan 0.4, comm 0.02 + 0.01, wait 0.1, compute the rest, host 0.5 - 0.4
    assert a["comm_s"] == approx(0.03) and a["wait_s"] == approx(0.1)
    assert a["compute_s"] == approx(0.27) and a["host_s"] == approx(0.1)
    assert a["busy_fraction"] == approx(0.6) and a["bubble_fraction"] == approx(0.4)
    assert a["exposed_comm_fraction"] == approx(0.06)
    # expert: plan 0.45, comm 0.01 + 0.04, wait 0.15, host 0.05
    assert f["comm_s"] == approx(0.05) and f["wait_s"] == approx(0.15)
    assert f["compute_s"] == approx(0.25) and f["host_s"] == approx(0.05)
    assert f["bubble_fraction"] == approx(0.4) and f["exposed_comm_fraction"] == approx(0.1)
    assert r["bubble_fraction"] == {"attention": a["bubble_fraction"], "expert": approx(0.4)}
    assert r["exposed_comm_fraction"] == {"attention": approx(0.06), "expert": approx(0.1)}
    assert r["attention_expert_balance"] == approx(0.27 / 0.25)
    # stage times are per worker of the side that ran them
    assert r["stage_time_per_step_s"]["dispatch"] == approx(0.02)
    assert r["stage_time_per_step_s"]["expert_send"] == approx(0.04)
    load = r["expert_load"]
    assert load["mean_tokens_per_expert_step"] == approx(1.0)  # (4 + 2 + 2 + 0) / 4 / k
    assert load["max_tokens_per_expert_step"] == approx(2.0)
    assert load["total_per_expert"] == [6, 2]
    assert r["wire_bytes_per_step"] == {"combine": 750, "dispatch": 1000}


def test_speedups_exact_values():
    run: dict = {}
    # base K = 1 steps of 2.0 and 3.0 s; the run's K = 2 steps of 2.0 and 4.0 s (1.0, 2.0 each)
    pipeline.add_speedup(run, "m1", [2.0, 4.0], 2, [2.0, 3.0], 1)
    assert run["speedup_vs_m1"] == pytest.approx(2.5 / 1.5)
    rounds = run["speedup_vs_m1_per_round"]
    assert rounds["values"] == pytest.approx([2.0, 1.5])
    assert (rounds["median"], rounds["min"], rounds["max"]) == pytest.approx((1.75, 1.5, 2.0))


def test_steps_list_parsing():
    assert pipeline.parse_steps_list("4") == [4]
    assert pipeline.parse_steps_list("1,4") == [1, 4]
    for bad in ("", "0", "1,1", "a", "2,-1", "1.5", str(2**64)):
        with pytest.raises(ValueError, match="--num-scheduler-steps"):
            pipeline.parse_steps_list(bad)


@pytest.mark.slow
def test_bench_pipeline_writes_json_png_and_trace(tmp_path, capsys):
    out = tmp_path / "pipeline"
    argv = ["bench", "pipeline", "--model", "tiny-qwen3-moe", "--batch-size", "6"]
    argv += ["--context-len", "5", "--steps", "3", "--warmup", "1", "--max-micro-batches", "3"]
    argv += ["--num-scheduler-steps", "1,2"]  # 3 decode steps of K = 2: two rounds
    argv += ["--output-dir", str(out), "--name", "tiny"]
    assert main(argv) == 0
    cfg = ModelConfig.from_pretrained(resolve_model("tiny-qwen3-moe"))
    result = json.loads((out / "tiny.json").read_text())
    assert result["command"] == "afd " + " ".join(argv)
    assert result["machine"]["name"] == machine_name() and result["date"] and "commit" in result
    assert result["rounds"] == 2 and result["num_scheduler_steps"] == [1, 2]
    assert result["comm_backend"] == "shm"
    runs = result["runs"]
    assert [(r["num_scheduler_steps"], r["m"]) for r in runs] == [
        (k, m) for k in (1, 2) for m in (1, 2, 3)
    ]
    for r in runs:
        k = r["num_scheduler_steps"]
        assert len(r["scheduling_step_times_s"]) == 2
        assert len(r["speedup_vs_m1_per_round"]["values"]) == 2
        assert len(r["speedup_vs_first_k_per_round"]["values"]) == 2
        step = r["step_time_s"]
        for side in ("attention", "expert"):
            s = r[side]
            # every part is a measured span: none negative, and together they are the step
            for part in ("compute_s", "comm_s", "wait_s", "host_s"):
                assert s[part] >= 0, (k, r["m"], side, part)
            total = s["compute_s"] + s["comm_s"] + s["wait_s"] + s["host_s"]
            assert total == pytest.approx(step)
            assert s["comm_s"] > 0 and s["compute_s"] > 0
        stages = r["stage_time_per_step_s"]
        transfers = stages["dispatch"] + stages["combine_copy"]
        assert r["attention"]["comm_s"] == pytest.approx(transfers)
        load = r["expert_load"]
        assert load["max_tokens_per_expert_step"] >= load["mean_tokens_per_expert_step"]
        # per decode step, every token reaches top_k experts
        routed = 6 * cfg.num_experts_per_tok * len(cfg.moe_layers)
        assert load["mean_tokens_per_expert_step"] * cfg.n_routed_experts == routed
        assert sum(load["total_per_expert"]) == 2 * k * routed
        # every token row crosses to the one expert worker once per MoE layer and comes back
        wire, row = r["wire_bytes_per_step"], cfg.hidden_size * 4  # float32
        assert wire["combine"] == 6 * row * len(cfg.moe_layers)
        meta = 2 * cfg.num_experts_per_tok * 4  # ids and weights, int32
        assert wire["dispatch"] == 6 * (row + meta) * len(cfg.moe_layers)
    assert result["dispatch_dtype"] == "auto"
    trace = json.loads((out / "tiny_trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {f"K={k} m={m}" for k in (1, 2) for m in (1, 2, 3)}
    # the traced scheduling step has every decode step of every micro-batch and MoE layer
    for k in (1, 2):
        for m in (1, 2, 3):
            names = [e["name"] for e in trace if e["pid"] == f"K={k} m={m}"]
            for i in range(m):
                assert names.count(f"experts L0 mb{i}") == names.count(f"attn L0 mb{i}") == k
    assert (out / "tiny_timeline.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "speedup" in table and "bubble A" in table and "A->F MB" in table


def test_bench_pipeline_rejects_bad_sizes(capsys):
    for argv in (["--batch-size", "0"], ["--num-scheduler-steps", "0,4"]):
        assert main(["bench", "pipeline", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and argv[0] in err[0]

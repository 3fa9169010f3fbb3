"""`afd bench pipeline` end to end on a tiny model: one run measures every m side by side."""

from __future__ import annotations

import json

import pytest

from afd.builtin import resolve_model
from afd.config import ModelConfig
from afd.entrypoints.cli import main


@pytest.mark.slow
def test_bench_pipeline_writes_json_png_and_trace(tmp_path, capsys):
    out = tmp_path / "pipeline"
    argv = ["bench", "pipeline", "--model", "tiny-qwen3-moe", "--batch-size", "6"]
    argv += ["--context-len", "5", "--steps", "3", "--warmup", "1", "--max-micro-batches", "3"]
    argv += ["--num-scheduler-steps", "2"]  # 3 decode steps: two scheduling steps of 2
    assert main([*argv, "--output-dir", str(out)]) == 0
    cfg = ModelConfig.from_pretrained(resolve_model("tiny-qwen3-moe"))
    result = json.loads((out / "pipeline.json").read_text())
    runs = result["runs"]
    assert [r["m"] for r in runs] == [1, 2, 3]
    assert runs[0]["speedup_vs_m1"] == 1.0
    assert result["decode_steps"] == 4
    for r in runs:
        assert r["decode_tokens_per_s"] > 0
        stages = r["stage_time_per_step_s"]
        assert stages["attention"] > 0 and stages["expert"] > 0
        assert 0 <= r["bubble_fraction"]["attention"] < 1
        assert 0 <= r["bubble_fraction"]["expert"] < 1
        # the traced scheduling step has both decode steps of every micro-batch and MoE layer
        names = [e[1] for e in r["events"]]
        for i in range(r["m"]):
            assert names.count(f"experts L0 mb{i}") == names.count(f"attn L0 mb{i}") == 2
        load = r["expert_load"]
        assert load["max_tokens_per_expert_step"] >= load["mean_tokens_per_expert_step"]
        # per decode step, every token reaches top_k experts
        routed = 6 * cfg.num_experts_per_tok * len(cfg.moe_layers)
        assert load["mean_tokens_per_expert_step"] * cfg.n_routed_experts == routed
        assert sum(load["total_per_expert"]) == 2 * 2 * routed
        # every routed token row crosses to the one expert worker and comes back
        wire = r["wire_bytes_per_step"]
        row = cfg.hidden_size * 4  # float32
        assert wire["combine"] == 6 * row * len(cfg.moe_layers)
        assert wire["dispatch"] == 6 * (row + 2 * cfg.num_experts_per_tok * 4) * len(cfg.moe_layers)
    assert result["dispatch_dtype"] == "auto" and result["commit"] and result["machine"]["cores"]
    trace = json.loads((out / "pipeline_trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {"m=1", "m=2", "m=3"}
    assert (out / "pipeline_timeline.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "speedup" in table and "bubble A" in table and "A->F MB" in table


def test_bench_pipeline_rejects_bad_sizes(capsys):
    assert main(["bench", "pipeline", "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size" in err[0]

"""The held-out bench models: other architectures than the Qwen3-MoE shapes the planner was
tuned on, built from their own transformers classes, and served token for token like them."""

from __future__ import annotations

import json

import pytest
from conftest import hf_greedy, mixed_prompts

from afd import LLM, SamplingParams
from afd.builtin import HELD_OUT, bench_model_path
from afd.config import ModelConfig
from afd.scheduler.planner.step_model import ModelShape

WANT = {
    "bench-heldout-mla": ("deepseek_v2", "mla"),
    "bench-heldout-qwen2-moe": ("qwen2_moe", "gqa"),
}


@pytest.mark.parametrize("name", HELD_OUT)
def test_held_out_model_is_its_architecture_and_matches_transformers(name):
    path = bench_model_path(name)
    model_type, attention = WANT[name]
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    shape = ModelShape.from_config(ModelConfig.from_pretrained(path), name)
    assert shape.attention == attention and shape.shared_intermediate > 0
    assert shape.layers == 8 and shape.moe_layers >= 7
    prompts = mixed_prompts(3, shape.vocab, seed=1)
    want, _ = hf_greedy(path, prompts, 6)
    llm = LLM(str(path), dtype="float32")
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == want

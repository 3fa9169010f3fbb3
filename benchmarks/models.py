"""Benchmark models: tiny random MoE checkpoints shaped so that on a CPU the attention side and
the expert side take the balance the name says (generated once into the AFD cache). The three
Qwen3-MoE shapes are the ones the profiler and planner were tuned on; the `held-out` ones are
other architectures, for accuracy the model was never fitted to (docs/planner.md)."""

from __future__ import annotations

from pathlib import Path

# Eight layers each: filling and draining the ping-pong costs about one layer of one side.
_COMMON = dict(num_hidden_layers=8, mlp_only_layers=[], intermediate_size=512, head_dim=64)
BENCH_MODELS: dict[str, dict] = {
    # attention (projections + paged attention over ~32-64 tokens) ~ experts (top-2 of 4)
    "bench-balanced-moe": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
    ),
    # many KV heads and cheap experts: the attention side dominates, more so at long context
    "bench-attention-heavy": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_experts=8,
        num_experts_per_tok=1,
        moe_intermediate_size=128,
    ),
    # one KV head and wide top-4 experts: the expert side dominates
    "bench-expert-heavy": dict(
        _COMMON,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=1024,
    ),
    # held out: DeepSeek-V2-style MLA (compressed KV, decoupled RoPE), a dense first layer,
    # shared experts beside group-limited top-2 routing
    "bench-heldout-mla": dict(
        family="deepseek-v2",
        num_hidden_layers=8,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=8,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        intermediate_size=1024,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=512,
    ),
    # held out: Qwen2-MoE, a gated shared expert on every layer, QKV bias, unnormalised top-4
    "bench-heldout-qwen2-moe": dict(
        family="qwen2-moe",
        num_hidden_layers=8,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=1024,
    ),
}
HELD_OUT = ("bench-heldout-mla", "bench-heldout-qwen2-moe")
_VERSION = {"bench-balanced-moe": 5}


def bench_model_path(name: str) -> Path:
    """The checkpoint of benchmark model `name`, built on first use."""
    from afd.builtin import VOCAB_SIZE, cache_dir, train_bytelevel_bpe
    from afd.models.tiny import build_tiny_checkpoint

    path = cache_dir() / "models" / f"{name}-v{_VERSION.get(name, 1)}"
    if not (path / "config.json").is_file():
        shape = dict(BENCH_MODELS[name])
        family = shape.pop("family", "qwen3-moe")
        train_bytelevel_bpe(path, VOCAB_SIZE)
        build_tiny_checkpoint(family, path, seed=0, vocab_size=VOCAB_SIZE, **shape)
    return path


def resolve_bench_model(name: str) -> Path:
    """A benchmark model's path, else what afd.builtin.resolve_model makes of `name`."""
    from afd.builtin import resolve_model

    return bench_model_path(name) if name in BENCH_MODELS else resolve_model(name)

"""Benchmark models: tiny random Qwen3-MoE checkpoints shaped so that on a CPU the attention
side and the expert side take the balance the name says (generated once into the AFD cache)."""

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
}
_VERSION = {"bench-balanced-moe": 5}


def bench_model_path(name: str) -> Path:
    """The checkpoint of benchmark model `name`, built on first use."""
    from afd.builtin import VOCAB_SIZE, cache_dir, train_bytelevel_bpe
    from afd.models.tiny import build_tiny_checkpoint

    path = cache_dir() / "models" / f"{name}-v{_VERSION.get(name, 1)}"
    if not (path / "config.json").is_file():
        train_bytelevel_bpe(path, VOCAB_SIZE)
        build_tiny_checkpoint(
            "qwen3-moe", path, seed=0, vocab_size=VOCAB_SIZE, **BENCH_MODELS[name]
        )
    return path


def resolve_bench_model(name: str) -> Path:
    """A benchmark model's path, else what afd.builtin.resolve_model makes of `name`."""
    from afd.builtin import resolve_model

    return bench_model_path(name) if name in BENCH_MODELS else resolve_model(name)

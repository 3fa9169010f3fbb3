"""Random Qwen3-MoE checkpoints that both AFD and vLLM's CPU build load (head_dim >= 32: vLLM's
CPU attention refuses the built-in models' 16), for `afd bench peer`. Built deterministically with
transformers' `save_pretrained` plus AFD's trained tokenizer, once, into the AFD cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from afd.builtin import build_builtin, cache_dir, resolve_model

_COMMON = dict(
    hidden_size=256,
    num_hidden_layers=4,
    mlp_only_layers=[],
    intermediate_size=512,
)
PEER_MODELS: dict[str, dict] = {
    # the shape of issue 20's table: hidden 256, 4 layers, 16 experts top-4
    "peer-qwen3-moe": dict(
        _COMMON,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
    ),
    # many heads and KV heads, one narrow expert per token: attention dominates a step
    "peer-attention-heavy": dict(
        _COMMON,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=1,
        moe_intermediate_size=128,
    ),
    # one KV head and wide top-4 experts: the experts dominate a step
    "peer-expert-heavy": dict(
        _COMMON,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=1024,
    ),
}
_VERSION = 1


def peer_model_path(name: str) -> Path:
    """The checkpoint of peer model `name` (built on first use); any other name as AFD resolves
    it (a directory, a built-in or bench model: those do not all load in vLLM)."""
    if name not in PEER_MODELS:
        return resolve_model(name)
    target = cache_dir() / "models" / f"{name}-v{_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=target.parent))
    try:
        build_peer_model(name, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_peer_model(name: str, out_dir: str | Path) -> Path:
    """Write peer model `name` (float32 weights, config, tokenizer) into `out_dir`: the built-in
    tiny-qwen3-moe recipe (same tokenizer, seed and EOS ids) in this shape."""
    build_builtin("tiny-qwen3-moe", out_dir, **PEER_MODELS[name])
    return Path(out_dir)

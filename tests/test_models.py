"""Our models against transformers: greedy tokens and logprobs, through the paged cache."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy

from afd.kernels.metadata import AttentionMetadata
from afd.loader import count_parameter_bytes, load_model
from afd.models import allocate_kv_cache
from afd.models.tiny import FAMILIES, build_tiny_checkpoint

BLOCK = 4


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=3)


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, vocab, (3 + 5 * i % 17,), generator=g).tolist() for i in range(n)]


def _run_paged(model, prompts, new_tokens, chunk=None):
    """Greedy decode through the paged cache: varlen prefill (optionally chunked), then batched
    decode; returns tokens and per-step log-softmax rows."""
    cfg = model.config
    blocks_per_seq = (max(map(len, prompts)) + new_tokens) // BLOCK + 2
    caches = allocate_kv_cache(cfg, blocks_per_seq * len(prompts) + 1, BLOCK, torch.float32, "cpu")
    tables = [
        list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))[::-1]
        for i in range(len(prompts))
    ]
    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)
    outs: list[list[int]] = [[] for _ in prompts]
    lps: list[list[torch.Tensor]] = [[] for _ in prompts]
    while any(len(o) < new_tokens for o in outs):
        q_lens = []
        for i, s in enumerate(seqs):
            left = len(s) - done[i]
            q_lens.append(min(left, chunk) if chunk else left)
        active = [i for i in range(len(seqs)) if q_lens[i] > 0 and len(outs[i]) < new_tokens]
        ids, pos = [], []
        for i in active:
            ids += seqs[i][done[i] : done[i] + q_lens[i]]
            pos += list(range(done[i], done[i] + q_lens[i]))
        meta = AttentionMetadata.build(
            [q_lens[i] for i in active],
            [done[i] + q_lens[i] for i in active],
            [tables[i] for i in active],
            BLOCK,
        )
        with torch.inference_mode():
            h = model(torch.tensor(ids), torch.tensor(pos), meta, caches)
            last = meta.query_start_loc[1:] - 1
            logits = model.compute_logits(h[last.long()])
        for row, i in enumerate(active):
            done[i] += q_lens[i]
            if done[i] == len(seqs[i]):
                lp = torch.log_softmax(logits[row], -1)
                tok = int(lp.argmax())
                outs[i].append(tok)
                lps[i].append(lp)
                seqs[i].append(tok)
    return outs, lps


def _assert_same(ours, theirs):
    (o_tok, o_lp), (h_tok, h_lp) = ours, theirs
    for i, (a, b) in enumerate(zip(o_tok, h_tok, strict=True)):
        assert a == b, f"prompt {i}: {a} != {b}"
        for x, y in zip(o_lp[i], h_lp[i], strict=True):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=0)


def test_greedy_matches_transformers(checkpoint):
    model = load_model(checkpoint, dtype=torch.float32)
    prompts = _prompts(8, model.config.vocab_size)
    ref = hf_greedy(checkpoint, prompts, 32)
    _assert_same(_run_paged(model, prompts, 32), ref)
    _assert_same(_run_paged(model, prompts, 32, chunk=5), ref)


def test_weight_subsets(checkpoint):
    full = load_model(checkpoint, dtype=torch.float32)
    attn = load_model(checkpoint, dtype=torch.float32, part="attention")
    cfg = full.config
    e, inter, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    expert_bytes = len(cfg.moe_layers) * e * 3 * inter * h * 4
    assert count_parameter_bytes(attn) == count_parameter_bytes(full) - expert_bytes
    assert not any(".experts." in n for n, _ in attn.named_parameters())
    lo, hi = 1, e // 2 + 1
    shard = load_model(checkpoint, dtype=torch.float32, part="experts", expert_range=(lo, hi))
    assert count_parameter_bytes(shard) == len(cfg.moe_layers) * (hi - lo) * 3 * inter * h * 4
    layer = cfg.moe_layers[0]
    torch.testing.assert_close(
        shard.experts[str(layer)].w13, full.model.layers[layer].mlp.experts.w13[lo:hi]
    )


_YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
VARIANTS = {
    # every other layer is MoE, the rest dense
    "qwen3-sparse-step": (
        "qwen3-moe",
        dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[]),
    ),
    "qwen2-tied-normtopk": ("qwen2-moe", dict(tie_word_embeddings=True, norm_topk_prob=True)),
    # rotate-half rope (not interleaved) with YaRN, and MLA without q_lora_rank
    "deepseek-v3-yarn-halfrope": (
        "deepseek-v3",
        dict(rope_interleave=False, q_lora_rank=None, rope_parameters=_YARN),
    ),
    "deepseek-v2-greedy": (
        "deepseek-v2",
        dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=16),
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    path = build_tiny_checkpoint(family, tmp_path / variant, seed=5, **overrides)
    model = load_model(path, dtype=torch.float32)
    prompts = _prompts(4, model.config.vocab_size)
    ref = hf_greedy(path, prompts, 16)
    _assert_same(_run_paged(model, prompts, 16, chunk=3), ref)

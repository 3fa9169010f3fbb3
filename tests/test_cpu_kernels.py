"""The CPU fast paths (kernels/cpu_ops.py) against their torch references on random inputs at
edge shapes: batch 1, ragged lengths, contexts across page boundaries, cached prefixes, empty
experts, skipped expert ids, GQA, MLA, float32 and bfloat16 (tolerances of test_kernels)."""

from __future__ import annotations

import pytest
import torch
from test_kernels import (
    DTYPES,
    _edge_case_routing,
    _moe_weights,
    _paged_batch,
    assert_close,
    naive_paged_attention,
)

from afd.kernels import cpu_ops, ops, torch_ops
from afd.kernels.metadata import AttentionMetadata


@pytest.fixture(autouse=True)
def _torch_fast_paths(monkeypatch):
    """This file tests the torch fast paths; test_native_kernels.py the native ones."""
    monkeypatch.setenv("AFD_NATIVE_KERNELS", "0")


# ---- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (5, 256), (3, 4, 16)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    assert_close(cpu_ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype)
    res = torch.randn(*shape, generator=g).to(dtype)
    y, r = cpu_ops.rms_norm(x, w, 1e-5, res)
    y_ref, r_ref = torch_ops.rms_norm(x, w, 1e-5, res)
    assert_close(y, y_ref, dtype)
    assert torch.equal(r, r_ref)


# ---- fused MoE --------------------------------------------------------------------------------


@pytest.fixture(params=["padded", "grouped"])
def moe_path(request, monkeypatch):
    """Each test of fused_moe runs through both grouped GEMMs (padded bmm, torch._grouped_mm)."""
    monkeypatch.setattr(cpu_ops, "_use_padded", lambda *_: request.param == "padded")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_fused_moe_edge_routing(dtype, num_tokens, moe_path):
    """Expert 0 empty, expert 1 one token, ids -1 and E skipped."""
    g = torch.Generator().manual_seed(num_tokens)
    w13, w2 = _moe_weights(4, 48, 40, dtype)
    x = torch.randn(num_tokens, 48, generator=g).to(dtype)
    ids = _edge_case_routing(num_tokens, 4)
    weights = torch.rand(num_tokens, 2, generator=g)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    assert_close(cpu_ops.fused_moe(x, w13, w2, weights, ids), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(7, 2, 8), (64, 4, 16), (3, 4, 32)])
def test_fused_moe_random_routing_and_shards(dtype, num_tokens, top_k, num_experts, moe_path):
    g = torch.Generator().manual_seed(num_tokens + top_k)
    w13, w2 = _moe_weights(num_experts, 32, 24, dtype, seed=3)
    x = torch.randn(num_tokens, 32, generator=g).to(dtype)
    weights, ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    assert_close(cpu_ops.fused_moe(x, w13, w2, weights, ids), ref, dtype)
    # A shard holding experts [2, E) sees the others as -1.
    local = torch.where(ids >= 2, ids - 2, -1)
    ref = torch_ops.fused_moe(x, w13[2:], w2[2:], weights, local)
    assert_close(cpu_ops.fused_moe(x, w13[2:], w2[2:], weights, local), ref, dtype)


def test_fused_moe_nothing_routed_and_no_tokens(moe_path):
    w13, w2 = _moe_weights(2, 16, 16, torch.float32)
    x = torch.randn(3, 16)
    ids = torch.tensor([[-1, 2], [5, -3], [2, 2]])
    assert torch.equal(cpu_ops.fused_moe(x, w13, w2, torch.ones(3, 2), ids), torch.zeros(3, 16))
    assert cpu_ops.fused_moe(x[:0], w13, w2, torch.ones(0, 2), ids[:0]).shape == (0, 16)


def test_fused_moe_path_by_shape():
    assert cpu_ops._use_padded(16, cpu_ops.MOE_PAD_ROWS, 64, 15)  # decode: weight reads dominate
    assert not cpu_ops._use_padded(16, 1, 4, 4)  # one token: 12 empty experts' weights unread
    assert not cpu_ops._use_padded(16, 550, 8192, 16)  # prefill: a GEMM per expert


# ---- paged attention --------------------------------------------------------------------------


def _caches(num_blocks, block_size, num_kv_heads, head_dim, v_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, v_dim, generator=g).to(dtype)
    return k, v


def _prefill_meta(query_lens, seq_lens, block_size, num_blocks, seed=0):
    """Varlen metadata over shuffled pages: query_lens[b] new tokens after the cached rest."""
    tables = _paged_batch(seq_lens, block_size, num_blocks, seed).block_tables
    lists = [t[: -(-s // block_size)] for t, s in zip(tables.tolist(), seq_lens, strict=True)]
    return AttentionMetadata.build(query_lens, seq_lens, lists, block_size)


DECODE_LENS = [[1], [1, 6, 16, 23], [40, 3, 33, 17, 1]]  # batch 1, ragged, page-crossing
PREFILL = [
    ([5], [5]),  # batch 1, no cache
    ([3, 2, 7], [3, 9, 7]),  # a cached prefix (9 = 7 cached + 2 new)
    ([1, 6, 1, 12], [20, 6, 33, 30]),  # decode rows next to chunked prefill
    ([30, 2, 4, 1], [30, 40, 4, 2]),  # lengths that split into length groups
]


@pytest.mark.parametrize("dtype", DTYPES)
# MHA, GQA ratios 2-8 and one KV head (the SDPA folds a KV head's query heads into its rows)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (16, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("seq_lens", DECODE_LENS)
def test_paged_decode(dtype, num_heads, num_kv_heads, seq_lens):
    meta = _paged_batch(seq_lens, 4, num_blocks=40)
    k_cache, v_cache = _caches(40, 4, num_kv_heads, 16, 8, dtype, seed=num_heads)
    q = torch.randn(len(seq_lens), num_heads, 16, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.25)
    assert_close(cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.25), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens,seq_lens", PREFILL)
def test_paged_prefill(dtype, query_lens, seq_lens):
    meta = _prefill_meta(query_lens, seq_lens, 4, num_blocks=40, seed=2)
    k_cache, v_cache = _caches(40, 4, 2, 16, 16, dtype, seed=3)
    q = torch.randn(sum(query_lens), 6, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.3)
    assert_close(cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.3), ref, dtype)
    if dtype == torch.float32:  # and the reference itself against attention written out
        assert_close(ref, naive_paged_attention(q, k_cache, v_cache, meta, 0.3), dtype)


def test_one_metadata_serves_every_layer():
    """The length groups are derived once per forward and kept on the metadata: the next
    layer (other queries and caches, the same metadata) still matches the reference."""
    meta = _prefill_meta([1, 6, 1, 12], [20, 6, 33, 30], 4, num_blocks=40, seed=2)
    for layer in range(3):
        k_cache, v_cache = _caches(40, 4, 2, 16, 16, torch.float32, seed=10 + layer)
        q = torch.randn(20, 6, 16, generator=torch.Generator().manual_seed(layer))
        ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.3)
        assert_close(cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.3), ref, torch.float32)
        assert "cpu_length_groups" in meta.derived


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens,seq_lens", [([1] * 4, [1, 6, 16, 23]), *PREFILL])
def test_mla(dtype, query_lens, seq_lens):
    latent, rope = 32, 8
    meta = _prefill_meta(query_lens, seq_lens, 4, num_blocks=40, seed=5)
    g = torch.Generator().manual_seed(6)
    kv_cache = torch.randn(40, 4, latent + rope, generator=g).to(dtype)
    q_latent = torch.randn(sum(query_lens), 5, latent, generator=g).to(dtype)
    q_rope = torch.randn(sum(query_lens), 5, 16 + rope, generator=g).to(dtype)[..., 16:]
    ref = torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.2)
    assert_close(cpu_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.2), ref, dtype)


def test_length_groups_bound_the_padding():
    q_lens, seq_lens = [30, 2, 4, 1, 1, 0], [30, 40, 4, 2, 38, 9]
    groups = cpu_ops._length_groups(q_lens, seq_lens)
    assert sorted(b for g in groups for b in g) == [0, 1, 2, 3, 4]  # q_len 0 is no work
    for g in groups:
        real = sum(q_lens[b] * seq_lens[b] for b in g)
        padded = len(g) * max(q_lens[b] for b in g) * max(seq_lens[b] for b in g)
        assert padded <= cpu_ops.PAD_WASTE * real
    assert len(cpu_ops._length_groups([1] * 8, [100 + b for b in range(8)])) == 1


# ---- selection through ops --------------------------------------------------------------------


def test_cpu_backend_selection():
    before = ops.get_kernel_backend()
    x = torch.randn(2, 16)
    try:
        for name in ("auto", "cpu"):
            ops.set_kernel_backend(name)
            for kernel, impl in cpu_ops.CPU_IMPLS.items():
                assert ops._pick(kernel, x) is impl
            assert ops._pick("fused_moe_fp8", x) is torch_ops.fused_moe_fp8  # no fast path
        ops.set_kernel_backend("torch")
        assert ops._pick("fused_moe", x) is torch_ops.fused_moe
    finally:
        ops.set_kernel_backend(before)

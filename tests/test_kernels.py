"""Triton kernels against their torch references, on CPU through TRITON_INTERPRET=1 (conftest).

Tolerances: fp32 atol = rtol = 1e-4 (reassociated sums only); bf16 atol = rtol = 3e-2 (the
kernels accumulate in fp32 where the references round some intermediates to bf16).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from afd.kernels import ops, torch_ops  # noqa: E402
from afd.kernels.triton_attention import mla_decode_attention, paged_decode_attention  # noqa: E402
from afd.kernels.triton_moe import fused_moe as triton_fused_moe  # noqa: E402
from afd.kernels.triton_moe import moe_align_block_size  # noqa: E402
from afd.kernels.triton_norm import rms_norm as triton_rms_norm  # noqa: E402

from afd.models.metadata import AttentionMetadata  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@pytest.fixture
def backend():
    """Restores the kernel backend a test switches."""
    before = ops.get_kernel_backend()
    yield ops.set_kernel_backend
    ops.set_kernel_backend(before)


# ---- RMSNorm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 16)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    assert_close(triton_rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=g).to(dtype)
    res = torch.randn(6, 40, generator=g).to(dtype)
    w = torch.rand(40, generator=g).to(dtype)
    y, r = triton_rms_norm(x, w, 1e-5, res)
    y_ref, r_ref = torch_ops.rms_norm(x, w, 1e-5, res)
    assert_close(y, y_ref, dtype)
    assert torch.equal(r, r_ref)  # the residual sum is rounded once, exactly as the reference


# ---- fused MoE --------------------------------------------------------------------------------


def _moe_weights(num_experts, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5).to(dtype)
    return w13, w2


def _edge_case_routing(num_tokens: int, num_experts: int = 4) -> torch.Tensor:
    """[T, 2] ids: expert 0 gets none, expert 1 exactly one, expert 2 gets T - 1 (not a multiple
    of 16), expert 3 the rest; out-of-range ids (-1 and E, what a shard sees) are sprinkled in."""
    ids = torch.full((num_tokens, 2), 3, dtype=torch.int64)
    ids[:, 0] = 2
    ids[0, 0] = 1
    ids[1::3, 1] = -1
    ids[2::5, 1] = num_experts
    return ids


def test_moe_align_block_size_groups_every_slot_once():
    ids = _edge_case_routing(19)
    num_experts, block_m = 4, 16
    sorted_ids, block_experts = moe_align_block_size(ids, num_experts, block_m)
    n = ids.numel()
    flat = ids.reshape(-1)
    assert sorted_ids.numel() == block_experts.numel() * block_m
    real = sorted_ids[sorted_ids < n].long()
    valid_slots = torch.nonzero((flat >= 0) & (flat < num_experts)).flatten()
    assert torch.equal(real.sort().values, valid_slots)  # each valid slot once, invalid never
    for pos in range(sorted_ids.numel()):
        slot = int(sorted_ids[pos])
        if slot < n:  # a real slot sits in a block of its own expert
            assert int(block_experts[pos // block_m]) == int(flat[slot])
    counts = torch.bincount(flat[valid_slots], minlength=num_experts)
    used = block_experts[block_experts >= 0]
    for e in range(num_experts):
        assert int((used == e).sum()) == (int(counts[e]) + block_m - 1) // block_m
    assert (block_experts[len(used) :] == -1).all()  # unused tail blocks are marked


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 19])
def test_fused_moe_edge_cases(dtype, num_tokens):
    g = torch.Generator().manual_seed(num_tokens)
    hidden, inter, num_experts = 48, 40, 4  # neither a multiple of the 64-wide tiles
    w13, w2 = _moe_weights(num_experts, hidden, inter, dtype)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    ids = _edge_case_routing(num_tokens, num_experts)
    weights = torch.rand(num_tokens, 2, generator=g)
    out = triton_fused_moe(x, w13, w2, weights, ids, block_m=16)
    assert_close(out, torch_ops.fused_moe(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(7, 2, 8), (33, 4, 6)])
def test_fused_moe_random_routing(num_tokens, top_k, num_experts):
    g = torch.Generator().manual_seed(7)
    hidden, inter = 32, 24
    w13, w2 = _moe_weights(num_experts, hidden, inter, torch.float32, seed=3)
    x = torch.randn(num_tokens, hidden, generator=g)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    weights, ids = scores.topk(top_k, dim=-1)
    out = triton_fused_moe(x, w13, w2, weights, ids)  # default block size heuristic
    assert_close(out, torch_ops.fused_moe(x, w13, w2, weights, ids), torch.float32)
    # A shard holding experts [2, E) sees the others as out-of-range ids and drops them.
    local = torch.where(ids >= 2, ids - 2, -1)
    shard = triton_fused_moe(x, w13[2:], w2[2:], weights, local)
    assert_close(shard, torch_ops.fused_moe(x, w13[2:], w2[2:], weights, local), torch.float32)


def test_fused_moe_all_ids_out_of_range_and_empty():
    w13, w2 = _moe_weights(2, 16, 16, torch.float32)
    x = torch.randn(3, 16)
    ids = torch.tensor([[-1, 2], [5, -3], [2, 2]])
    assert torch.equal(triton_fused_moe(x, w13, w2, torch.ones(3, 2), ids), torch.zeros(3, 16))
    empty = triton_fused_moe(x[:0], w13, w2, torch.ones(0, 2), ids[:0])
    assert empty.shape == (0, 16)


# ---- paged decode attention -------------------------------------------------------------------


def _paged_batch(seq_lens, block_size, num_blocks, seed=0):
    """Block tables drawn from a shuffled pool, so each sequence's pages are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for s in seq_lens:
        n = (s + block_size - 1) // block_size
        tables.append(pool[:n])
        pool = pool[n:]
    return AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, block_size)


SEQ_LENS = [1, 6, 16, 23]  # length 1, not multiples of the block size, one exact multiple


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_paged_decode_gqa_ratios(dtype, num_heads, num_kv_heads):
    block_size, head_dim = 4, 16
    meta = _paged_batch(SEQ_LENS, block_size, num_blocks=24)
    g = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    q = torch.randn(len(SEQ_LENS), num_heads, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(24, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(24, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.25)
    out = paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25, block_n=16
    )
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 3])
def test_paged_decode_split_k(dtype, num_splits):
    # With 3 splits of 16 tokens, short sequences leave whole splits empty (merged with weight 0).
    block_size, head_dim, v_dim = 8, 16, 8  # V narrower than K
    seq_lens = [1, 9, 40]
    meta = _paged_batch(seq_lens, block_size, num_blocks=12, seed=1)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(12, block_size, 2, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(12, block_size, 2, v_dim, generator=g).to(dtype)
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.3)
    out = paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.3, 40, num_splits, block_n=16
    )
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_mla_decode(dtype, num_splits):
    latent, rope, block_size = 32, 8, 4
    meta = _paged_batch(SEQ_LENS, block_size, num_blocks=20, seed=2)
    g = torch.Generator().manual_seed(11)
    q_latent = torch.randn(4, 20, latent, generator=g).to(dtype)  # 20 heads: two head blocks
    q_full = torch.randn(4, 20, 16 + rope, generator=g).to(dtype)
    q_rope = q_full[..., 16:]  # a strided view, as the model's split produces
    kv_cache = torch.randn(20, block_size, latent + rope, generator=g).to(dtype)
    ref = torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.2)
    out = mla_decode_attention(
        q_latent, q_rope, kv_cache, meta.block_tables, meta.seq_lens, 0.2,
        num_splits=num_splits, block_n=16,
    )  # fmt: skip
    assert_close(out, ref, dtype)


def test_mla_decode_at_deepseek_v3_width():
    """128 heads (8 head blocks, launched next to each other), latent 512, rope 64, 64-token
    pages: DeepSeek-V3's decode shape."""
    latent, rope, block_size = 512, 64, 64
    meta = _paged_batch([70, 5], block_size, num_blocks=4, seed=3)
    g = torch.Generator().manual_seed(12)
    q_latent = torch.randn(2, 128, latent, generator=g).to(torch.bfloat16)
    q_rope = torch.randn(2, 128, rope, generator=g).to(torch.bfloat16)
    kv_cache = torch.randn(4, block_size, latent + rope, generator=g).to(torch.bfloat16)
    scale = (128 + rope) ** -0.5
    ref = torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, scale)
    out = mla_decode_attention(q_latent, q_rope, kv_cache, meta.block_tables, meta.seq_lens, scale)
    assert_close(out, ref, torch.bfloat16)


# ---- selection through ops --------------------------------------------------------------------


def test_backend_selection(backend):
    from afd.kernels import triton_ops

    x = torch.randn(2, 16)
    with pytest.raises(ValueError):
        backend("cuda")
    backend("auto")  # CPU tensors -> torch
    assert ops._pick("rms_norm", x) is torch_ops.rms_norm
    backend("torch")
    assert ops._pick("fused_moe", x) is torch_ops.fused_moe
    backend("triton")
    for name, impl in triton_ops.TRITON_IMPLS.items():
        assert ops._pick(name, x) is impl


def test_ops_triton_backend_matches_torch(backend):
    """The engine's call sites under the triton backend: decode and prefill batches."""
    g = torch.Generator().manual_seed(3)
    block_size = 4
    k_cache = torch.randn(16, block_size, 2, 16, generator=g)
    v_cache = torch.randn(16, block_size, 2, 16, generator=g)
    kv_cache = torch.randn(16, block_size, 40, generator=g)
    decode = _paged_batch([3, 9], block_size, 16, seed=4)
    prefill = AttentionMetadata.build([3, 2], [3, 9], decode.block_tables.tolist(), block_size)
    results = {}
    for name in ("torch", "triton"):
        backend(name)
        for tag, meta in (("decode", decode), ("prefill", prefill)):
            t = meta.slot_mapping.shape[0]
            q = torch.randn(t, 4, 16, generator=torch.Generator().manual_seed(t))
            ql = torch.randn(t, 4, 32, generator=torch.Generator().manual_seed(t + 1))
            results[name, tag] = (
                ops.paged_attention(q, k_cache, v_cache, meta, 0.25),
                ops.mla_attention(ql, q[..., :8], kv_cache, meta, 0.25),
            )
    for tag in ("decode", "prefill"):
        for got, want in zip(results["triton", tag], results["torch", tag], strict=True):
            assert_close(got, want, torch.float32)


# ---- rotary -----------------------------------------------------------------------------------


def _rope_config(kind: str):
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    if kind == "yarn":
        return DeepseekV3Config(
            qk_rope_head_dim=16,
            max_position_embeddings=2048,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,  # != mscale, so the attention factor is not 1
            },
        )
    default = {"rope_theta": 10000.0, "rope_type": "default"}
    return Qwen3MoeConfig(head_dim=16, rope_parameters=default)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,interleaved", [("default", False), ("yarn", True), ("yarn", False)])
def test_rotary_matches_model_rotary(dtype, kind, interleaved):
    """Both backends against the model's RotaryEmbedding (transformers' frequency init, YaRN)."""
    from afd.kernels.triton_rope import rotary_embedding

    from afd.models.layers import RotaryEmbedding

    rotary = RotaryEmbedding(_rope_config(kind), 16, interleaved=interleaved)
    g = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 1, 7, 600, 1500])  # past the original 512 for YaRN
    q = torch.randn(5, 3, 16, generator=g).to(dtype)
    k = torch.randn(5, 1, 16, generator=g).to(dtype)
    q_ref, k_ref = rotary(positions, q, k)
    cos, sin = rotary.cos_sin(positions, dtype)
    if kind == "yarn":
        assert rotary.attention_scaling != 1.0  # the YaRN factor is really in play
    for impl in (torch_ops.rotary_embedding, rotary_embedding):
        q_out, k_out = impl(q, k, cos, sin, interleaved)
        assert_close(q_out, q_ref, dtype)
        assert_close(k_out, k_ref, dtype)


# ---- benchmark --------------------------------------------------------------------------------


def test_bench_kernels_quick(tmp_path):
    import argparse

    from afd.benchmarks import kernels as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "kernels.json"
    args = parser.parse_args(["--quick", "--device", "cpu", "--iters", "1", "--output", str(out)])
    assert bench.run(args) == 0
    import json

    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["limits"]["copy_GBps"] > 0
    assert {r["kernel"] for r in report["results"]} == set(bench.QUICK_SWEEP)
    for row in report["results"]:
        assert row["time_us"] > 0 and row["fraction_of_copy_bw"] > 0
        if row["kernel"] == "fused_moe":
            assert row["TFLOPs"] > 0 and row["routed_tokens"] == 32 * 2


@pytest.mark.slow
def test_kernels_compile_for_cuda_without_a_gpu():
    """The compiled (non-interpreted) path: lower every kernel to sm_90 with Triton's own ptxas."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from afd.kernels.triton_compile_check import compile_all; "
        "print(len(compile_all(90, ('bf16',))))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240
    )
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr:
        pytest.skip("this triton build ships no ptxas")
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1]) == 12  # 8 kernels + 4 FP8 specialisations

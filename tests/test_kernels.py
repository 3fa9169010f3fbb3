"""Triton kernels against their torch references, on CPU through TRITON_INTERPRET=1 (conftest).

Tolerances: fp32 atol = rtol = 1e-4 (reassociated sums only); bf16 atol = rtol = 3e-2 (the
kernels accumulate in fp32 where the references round some intermediates to bf16).
Triton is a test dependency: if it fails to import, these tests fail (never skip).
"""

from __future__ import annotations

import math

import pytest
import torch

from afd.kernels import cpu_ops, ops, torch_ops
from afd.kernels.metadata import AttentionMetadata
from afd.kernels.triton_attention import mla_decode_attention, paged_decode_attention
from afd.kernels.triton_moe import fused_moe as triton_fused_moe
from afd.kernels.triton_moe import moe_align_block_size
from afd.kernels.triton_norm import rms_norm as triton_rms_norm

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
    backend("auto")  # CPU tensors -> the cpu fast paths (tests/test_cpu_kernels.py)
    assert ops._pick("rms_norm", x) is cpu_ops.rms_norm
    backend("torch")
    assert ops._pick("fused_moe", x) is torch_ops.fused_moe
    backend("triton")
    for name, impl in triton_ops.TRITON_IMPLS.items():
        assert ops._pick(name, x) is impl


def naive_paged_attention(q, k_cache, v_cache, meta, scale):
    """Causal attention written out: each query row against its sequence's keys, gathered page by
    page from the block table one position at a time, softmax in float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=torch.float64)
    starts, bs = meta.query_start_loc.tolist(), k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    for b, seq_len in enumerate(meta.seq_lens.tolist()):
        table = meta.block_tables[b].tolist()
        keys = torch.stack([k_cache[table[p // bs], p % bs] for p in range(seq_len)]).double()
        vals = torch.stack([v_cache[table[p // bs], p % bs] for p in range(seq_len)]).double()
        q_len = starts[b + 1] - starts[b]
        for i in range(q_len):
            row, visible = starts[b] + i, seq_len - q_len + i + 1  # keys 0 .. own position
            for h in range(q.shape[1]):
                kv = h // group
                scores = keys[:visible, kv] @ q[row, h].double() * scale
                out[row, h] = torch.softmax(scores, 0) @ vals[:visible, kv]
    return out.to(q.dtype)


def test_ops_triton_backend_against_naive_attention(backend):
    """The engine's call sites under both backends, decode and prefill batches, against attention
    written out by hand (prefill under the triton backend runs the torch path: this checks that
    routing, and that the torch path is right)."""
    g = torch.Generator().manual_seed(3)
    block_size = 4
    k_cache = torch.randn(16, block_size, 2, 16, generator=g)
    v_cache = torch.randn(16, block_size, 2, 16, generator=g)
    kv_cache = torch.randn(16, block_size, 40, generator=g)
    decode = _paged_batch([3, 9], block_size, 16, seed=4)
    prefill = AttentionMetadata.build([3, 2], [3, 9], decode.block_tables.tolist(), block_size)
    for name in ("torch", "triton"):
        backend(name)
        for meta in (decode, prefill):
            t = meta.slot_mapping.shape[0]
            q = torch.randn(t, 4, 16, generator=torch.Generator().manual_seed(t))
            ql = torch.randn(t, 4, 32, generator=torch.Generator().manual_seed(t + 1))
            want = naive_paged_attention(q, k_cache, v_cache, meta, 0.25)
            assert_close(ops.paged_attention(q, k_cache, v_cache, meta, 0.25), want, torch.float32)
            # absorbed MLA: keys are [latent, rope key], values the latent
            mla_k = kv_cache.unsqueeze(2)
            mla_v = kv_cache[..., :32].unsqueeze(2)
            want = naive_paged_attention(torch.cat([ql, q[..., :8]], -1), mla_k, mla_v, meta, 0.25)
            got = ops.mla_attention(ql, q[..., :8], kv_cache, meta, 0.25)
            assert_close(got, want, torch.float32)


# ---- rotary -----------------------------------------------------------------------------------

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.5,  # != mscale, so the attention factor is not 1
}


def _rope_config(kind: str):
    from transformers import DeepseekV3Config, Qwen3MoeConfig

    if kind == "yarn":
        return DeepseekV3Config(
            qk_rope_head_dim=16, max_position_embeddings=2048, rope_parameters=dict(YARN)
        )
    default = {"rope_theta": 10000.0, "rope_type": "default"}
    return Qwen3MoeConfig(head_dim=16, rope_parameters=default)


def yarn_naive(dim, base, factor, original_max, beta_fast, beta_slow, mscale, mscale_all_dim):
    """YaRN (Peng et al. 2023, as in DeepSeek's reference code), written out: rotation counts
    beta_fast / beta_slow over the original context mark the dimensions kept / interpolated by
    `factor`, with a linear ramp between; attention factor from the two mscales."""
    rotations = lambda i: original_max / (2 * math.pi * base ** (2 * i / dim))  # noqa: E731
    low = next(i for i in range(dim // 2) if rotations(i) < beta_fast) - 1
    high = next(i for i in range(dim // 2) if rotations(i) < beta_slow)
    inv_freq = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(1.0, max(0.0, (i - low) / (high - low)))  # 0: keep, 1: interpolate
        inv_freq.append(theta * (1 - ramp) + theta / factor * ramp)
    get = lambda m: 0.1 * m * math.log(factor) + 1.0  # noqa: E731
    return torch.tensor(inv_freq, dtype=torch.float64), get(mscale) / get(mscale_all_dim)


def test_yarn_frequencies_match_the_formula():
    from afd.models.layers import RotaryEmbedding

    rotary = RotaryEmbedding(_rope_config("yarn"), 16, interleaved=True)
    inv_freq = rotary._init_freqs()
    want, scaling = yarn_naive(
        16, YARN["rope_theta"], YARN["factor"], YARN["original_max_position_embeddings"],
        YARN["beta_fast"], YARN["beta_slow"], YARN["mscale"], YARN["mscale_all_dim"],
    )  # fmt: skip
    torch.testing.assert_close(inv_freq.double(), want, atol=0, rtol=1e-6)
    assert rotary.attention_scaling == pytest.approx(scaling, rel=1e-9)
    # the case is not degenerate: the fastest frequency is kept, the slowest interpolated
    plain = YARN["rope_theta"] ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert want[0] == pytest.approx(float(plain[0]))
    assert want[-1] == pytest.approx(float(plain[-1]) / YARN["factor"])
    assert scaling != 1.0


def _hf_rotary(kind: str, interleaved: bool, positions, q, k):
    """transformers' own rotary module and apply function: [T, H, d] -> [T, H, d]."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qw

    cfg = _rope_config(kind)
    module = (
        ds.DeepseekV3RotaryEmbedding(cfg) if kind == "yarn" else qw.Qwen3MoeRotaryEmbedding(cfg)
    )
    cos, sin = module(q.float(), positions[None])  # [1, T, d], attention factor folded in
    apply = ds.apply_rotary_pos_emb_interleave if interleaved else ds.apply_rotary_pos_emb
    qh, kh = (t.float().transpose(0, 1)[None] for t in (q, k))  # [1, H, T, d]
    q_out, k_out = apply(qh, kh, cos, sin)
    return q_out[0].transpose(0, 1).to(q.dtype), k_out[0].transpose(0, 1).to(k.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,interleaved", [("default", False), ("yarn", True), ("yarn", False)])
def test_rotary_matches_transformers(dtype, kind, interleaved, backend):
    """The model's RotaryEmbedding under both kernel backends against transformers' rotary
    module and apply functions (its frequency init, YaRN and the interleaved layout)."""
    from afd.models.layers import RotaryEmbedding

    rotary = RotaryEmbedding(_rope_config(kind), 16, interleaved=interleaved)
    g = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 1, 7, 600, 1500])  # past the original 512 for YaRN
    q = torch.randn(5, 3, 16, generator=g).to(dtype)
    k = torch.randn(5, 1, 16, generator=g).to(dtype)
    q_ref, k_ref = _hf_rotary(kind, interleaved, positions, q, k)
    for name in ("torch", "triton"):
        backend(name)
        q_out, k_out = rotary(positions, q, k)
        assert_close(q_out, q_ref, dtype)
        assert_close(k_out, k_ref, dtype)


# ---- benchmark --------------------------------------------------------------------------------


def _bench_args(*argv: str):
    import argparse

    from afd.benchmarks import kernels as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--quick", "--device", "cpu", "--warmup", "0", "--iters", "1",
                              "--min-time", "0", *argv])  # fmt: skip


def test_bench_kernels_checks_then_times_every_kernel(tmp_path):
    import json

    from afd.benchmarks import kernels as bench

    out = tmp_path / "kernels.json"
    assert bench.run(_bench_args("--backends", "triton,torch", "--output", str(out))) == 0
    report = json.loads(out.read_text())
    assert report["name"] == "kernels" and report["date"] and "commit" in report
    assert report["failed_checks"] == 0
    rows = report["results"]
    assert [(r["kernel"], r["backend"]) for r in rows] == [
        (k, be) for k in bench.QUICK_SWEEP for be in ("triton", "torch")
    ]
    for triton_row, torch_row in zip(rows[::2], rows[1::2], strict=True):
        for r in (triton_row, torch_row):
            check = r["check"]
            assert check["passed"] and check["error_norm"] <= check["bound_norm"], r
            assert r["calls"] == 1 and r["warmup"] == 0
        speedup = torch_row["time_us"] / triton_row["time_us"]
        assert triton_row["speedup_vs_torch"] == pytest.approx(speedup)
    moe = next(r for r in rows if r["kernel"] == "fused_moe")
    assert moe["routed_tokens"] == 32 * 2  # tokens x top_k, one shard holding every expert
    flops = 2 * 64 * 3 * 128 * 64  # routed rows x (gate, up, down) x hidden x inter
    assert moe["TFLOPs"] == pytest.approx(flops / (moe["time_us"] * 1e-6) / 1e12)
    # the ceilings are warmed up and repeated whatever the sweep
    for timing in (report["limits"]["copy_timing"], report["limits"]["matmul_timing"]):
        assert timing["warmup"] >= 3 and timing["calls"] >= 10


def test_bench_kernels_refuses_to_time_a_wrong_kernel(tmp_path, monkeypatch, capsys):
    """A Triton kernel 1% off is reported as failed and never timed; the run exits non-zero."""
    import json

    from afd.benchmarks import kernels as bench
    from afd.kernels import triton_ops

    real = triton_ops.TRITON_IMPLS["rms_norm"]

    def one_percent_off(x, w, eps, residual=None):
        y, r = real(x, w, eps, residual)
        return y * 1.01, r

    monkeypatch.setitem(triton_ops.TRITON_IMPLS, "rms_norm", one_percent_off)
    out = tmp_path / "kernels.json"
    args = _bench_args("--kernels", "rms_norm", "--backends", "triton,torch", "--output", str(out))
    assert bench.run(args) == 1
    rows = json.loads(out.read_text())["results"]
    assert not rows[0]["check"]["passed"] and "time_us" not in rows[0]
    assert rows[0]["check"]["error_norm"] == pytest.approx(0.01, rel=0.05)
    assert rows[1]["check"]["passed"] and "time_us" in rows[1]
    assert "FAILED output check" in capsys.readouterr().out


def test_bench_kernels_reports_a_ratio_above_the_ceiling_as_an_error(tmp_path, monkeypatch, capsys):
    import json

    from afd.benchmarks import kernels as bench

    tiny = {"copy_GBps": 1e-9, "matmul_TFLOPs": 1e-12}
    monkeypatch.setattr(bench, "device_limits", lambda device, dtype: tiny)
    out = tmp_path / "kernels.json"
    args = _bench_args("--kernels", "fused_moe", "--backends", "torch", "--output", str(out))
    assert bench.run(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["fraction_of_copy_bw"] is None and row["fraction_of_matmul"] is None
    assert len(row["measurement_error"]) == 2
    assert "MEASUREMENT ERROR" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_check_tells_a_low_precision_accumulator_from_fp32(dtype):
    """[64, 4096] x [4096, 256] in 64-wide blocks: an fp32 accumulator rounded once at the end
    passes the bench's output check; rounding the accumulator to the input dtype after every
    block (the bug of dropping the fp32 accumulator) fails it."""
    from afd.benchmarks.kernels import check_output

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 4096, generator=g).to(dtype)
    b = (torch.randn(4096, 256, generator=g) * 4096**-0.5).to(dtype)
    ref32 = a.float() @ b.float()

    def blocked(round_accumulator: bool) -> torch.Tensor:
        acc = torch.zeros(64, 256)
        for k0 in range(0, 4096, 64):
            acc = acc + a[:, k0 : k0 + 64].float() @ b[k0 : k0 + 64].float()
            if round_accumulator:
                acc = acc.to(dtype).float()
        return acc.to(dtype)

    assert check_output(blocked(False), ref32, a @ b, dtype)["passed"]
    assert not check_output(blocked(True), ref32, a @ b, dtype)["passed"]


PAGED = dict(batch=2, context=1000, q_heads=4, kv_heads=2, head_dim=64, block_size=16)
LONG_REDUCTIONS = [
    # both GEMMs reduce over 16+ blocks (hidden for gate/up, inter for down): with inter=1024 a
    # down GEMM accumulating in bf16 passed the check, the rounding of its input hiding it
    ("fused_moe", dict(tokens=8, hidden=1024, inter=4096, experts=2, top_k=2, shard=1)),
    ("paged_attention", PAGED),
    ("paged_attention", dict(PAGED, splits=2)),
    ("mla_attention", dict(batch=2, context=1000, q_heads=4, latent=64, rope=16, block_size=16)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "kernel,shape",
    LONG_REDUCTIONS,
    ids=[k + ("-split" * ("splits" in s)) for k, s in LONG_REDUCTIONS],
)
def test_long_reductions_pass_the_gpu_gate_interpreted(kernel, shape, dtype):
    """The GPU gate's check (tests/test_gpu_kernels.py) on CPU: reductions over 16 or more
    blocks in 16-bit dtypes, where an accumulator rounded to the input dtype would show."""
    from afd.benchmarks import kernels as bench

    torch.manual_seed(0)
    case = bench.make_case(kernel, shape, torch.device("cpu"), dtype)
    out = case.call("triton")()
    check = bench.check_output(out, case.reference(fp32=True), case.reference(fp32=False), dtype)
    assert check["passed"], check


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


def test_bench_kernels_times_the_cpu_backend_in_alternating_rounds(tmp_path, monkeypatch):
    import json

    from afd.benchmarks import kernels as bench

    order = []
    real = bench.Case.call
    monkeypatch.setattr(bench.Case, "call", lambda self, be: order.append(be) or real(self, be))
    out = tmp_path / "kernels.json"
    args = _bench_args("--kernels", "fused_moe,rotary_embedding", "--rounds", "3", "--threads",
                       "1", "--backends", "cpu,torch", "--output", str(out))  # fmt: skip
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["backends"] == ["cpu", "torch"] and report["threads"] == 1
    rows = report["results"]
    # rotary has no cpu fast path: only the reference is timed
    assert [(r["kernel"], r["backend"]) for r in rows] == [
        ("fused_moe", "cpu"), ("fused_moe", "torch"), ("rotary_embedding", "torch")
    ]  # fmt: skip
    moe_cpu, moe_torch = rows[0], rows[1]
    assert len(moe_cpu["round_time_us"]) == 3 and moe_cpu["check"]["passed"]
    assert moe_cpu["time_us"] == pytest.approx(sorted(moe_cpu["round_time_us"])[1])
    assert moe_cpu["speedup_vs_torch"] == pytest.approx(moe_torch["time_us"] / moe_cpu["time_us"])
    # fused_moe: both outputs checked, then rounds cpu, torch | torch, cpu | cpu, torch
    assert order[:8] == ["cpu", "torch", "cpu", "torch", "torch", "cpu", "cpu", "torch"]

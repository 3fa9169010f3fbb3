"""The native CPU MoE kernel (kernels/native.py, kernels/csrc/moe.c) against the torch reference
at edge shapes and 1 and 2 threads, its fallbacks (unsupported inputs, no compiler, disabled),
and the engine's greedy tokens with it on."""

from __future__ import annotations

import pytest
import torch
from test_cpu_kernels import DECODE_LENS, _caches
from test_kernels import _edge_case_routing, _moe_weights, _paged_batch

from afd.kernels import cpu_ops, native, torch_ops

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels do not build")

# fp32 against the reference: the two differ only in their sums' order.
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _check(x, w13, w2, weights, ids):
    out = native.fused_moe(x, w13, w2, weights, ids)
    assert out is not None
    torch.testing.assert_close(out, torch_ops.fused_moe(x, w13, w2, weights, ids), **TOL)
    return out


@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k",
    [
        (1, 256, 256, 16, 4),  # decode, one token
        (16, 256, 256, 16, 4),  # the peer model's decode batch
        (200, 256, 256, 16, 4),  # experts with more rows than a work item (RB)
        (5, 33, 17, 3, 2),  # H and I not multiples of the vector width or panel
        (7, 48, 40, 1, 1),  # E = 1, K = 1
        (9, 16, 8, 8, 8),  # K = E: every token to every expert
    ],
)
def test_random_routing(threads, tokens, hidden, inter, experts, top_k):
    g = torch.Generator().manual_seed(tokens * 31 + hidden)
    w13, w2 = _moe_weights(experts, hidden, inter, torch.float32, seed=tokens)
    x = torch.randn(tokens, hidden, generator=g)
    weights, ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1)
    _check(x, w13, w2, weights, ids)


@pytest.mark.parametrize("tokens", [1, 19])
def test_edge_routing_empty_expert_and_skipped_ids(threads, tokens):
    """Expert 0 empty, expert 1 one token, ids -1 and E skipped, int32 ids."""
    g = torch.Generator().manual_seed(tokens)
    w13, w2 = _moe_weights(4, 48, 40, torch.float32)
    x = torch.randn(tokens, 48, generator=g)
    ids = _edge_case_routing(tokens, 4)
    weights = torch.rand(tokens, 2, generator=g)
    _check(x, w13, w2, weights, ids)
    _check(x, w13, w2, weights, ids.to(torch.int32))


def test_nothing_routed_and_no_tokens():
    w13, w2 = _moe_weights(2, 16, 16, torch.float32)
    x = torch.randn(3, 16)
    ids = torch.tensor([[-1, 2], [5, -3], [2, 2]])
    assert torch.equal(native.fused_moe(x, w13, w2, torch.ones(3, 2), ids), torch.zeros(3, 16))
    assert native.fused_moe(x[:0], w13, w2, torch.ones(0, 2), ids[:0]).shape == (0, 16)


def test_terms_added_in_ascending_expert_order():
    """Slots listing experts in descending order give the reference's sum bit for bit when each
    term is exact (one-hot weights and inputs): the order, not just the set, is the reference's."""
    hidden, inter = 16, 16
    w13 = torch.zeros(3, 2 * inter, hidden)
    w13[:, :inter] = torch.eye(inter, hidden) * 20  # SiLU(20 x) ~ 20 x for x = 1
    w13[:, inter:] = torch.eye(inter, hidden)
    w2 = torch.stack([torch.eye(hidden, inter) * s for s in (1e8, -1e8, 1.0)])
    x = torch.eye(hidden)[:4]
    ids = torch.tensor([[2, 1, 0]] * 4)
    weights = torch.ones(4, 3)
    out = native.fused_moe(x, w13, w2, weights, ids)
    # (2e9 - 2e9) + 20 in expert order; the slots' order would give (20 - 2e9) + 2e9 = 0.
    assert torch.equal(out, torch_ops.fused_moe(x, w13, w2, weights, ids))
    assert torch.equal(out[:, :4].diagonal(), torch.full((4,), 20.0))


def test_packed_weights_follow_writes():
    """The packed copy kept on w13 is rebuilt after an in-place write to the weights."""
    w13, w2 = _moe_weights(4, 32, 24, torch.float32)
    x = torch.randn(6, 32)
    weights, ids = torch.rand(6, 4).topk(2, dim=-1)
    _check(x, w13, w2, weights, ids)
    w13.mul_(2)
    w2.add_(1)
    _check(x, w13, w2, weights, ids)


@pytest.mark.parametrize("what", ["x", "w13", "bf16", "k"])
def test_unsupported_inputs_fall_back(what):
    w13, w2 = _moe_weights(4, 32, 24, torch.float32)
    x = torch.randn(6, 32)
    weights, ids = torch.rand(6, 4).topk(2, dim=-1)
    if what == "x":
        x = torch.randn(32, 6).t()  # non-contiguous
    elif what == "w13":
        w13 = w13.transpose(1, 2).contiguous().transpose(1, 2)
    elif what == "bf16":
        x, w13, w2 = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    else:
        weights, ids = torch.rand(6, 100).topk(native.MAX_TOP_K + 1, dim=-1)
        ids = ids % 4
    assert native.fused_moe(x, w13, w2, weights, ids) is None
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    tol = TOL if x.dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(cpu_ops.fused_moe(x, w13, w2, weights, ids), ref, **tol)


# ---- paged decode attention ------------------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 16), (8, 2, 32), (6, 1, 20)])
@pytest.mark.parametrize("seq_lens", [*DECODE_LENS, [1000, 3]])
def test_paged_decode(threads, num_heads, num_kv_heads, head_dim, seq_lens):
    """Batch 1, ragged and page-crossing lengths, GQA/MHA/MQA, head_dim off the vector width."""
    blocks = sum(-(-s // 4) for s in seq_lens) + 3
    meta = _paged_batch(seq_lens, 4, num_blocks=blocks)
    k_cache, v_cache = _caches(blocks, 4, num_kv_heads, head_dim, 24, torch.float32, seed=2)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    out = native.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.25)
    assert out is not None
    ref = torch_ops.paged_attention(q, k_cache, v_cache, meta, 0.25)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.25), ref)


def test_mla_decode_reads_values_as_a_slice_of_the_keys(threads):
    latent, rope, seq_lens = 32, 8, [9, 1, 17]
    meta = _paged_batch(seq_lens, 4, num_blocks=12)
    g = torch.Generator().manual_seed(6)
    kv_cache = torch.randn(12, 4, latent + rope, generator=g)
    q_latent = torch.randn(3, 5, latent, generator=g)
    q_rope = torch.randn(3, 5, rope, generator=g)
    ref = torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.2)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = native.paged_decode
        mp.setattr(native, "paged_decode", lambda *a: calls.append(1) or real(*a))
        out = cpu_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.2)
    assert calls
    torch.testing.assert_close(out, ref, **TOL)


def test_wide_query_groups_keep_the_torch_path(monkeypatch):
    """MLA's 16 heads of 576 (36 KB of queries per KV head) run the torch fast path."""
    meta = _paged_batch([5, 9], 4, num_blocks=6)
    kv_cache = torch.randn(6, 4, 576)
    q_latent, q_rope = torch.randn(2, 16, 512), torch.randn(2, 16, 64)
    monkeypatch.setattr(native, "paged_decode", lambda *a: pytest.fail("native decode ran"))
    out = cpu_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.1)
    torch.testing.assert_close(out, torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, 0.1))


def test_decode_fallbacks():
    meta = _paged_batch([5, 9], 4, num_blocks=6)
    k_cache, v_cache = _caches(6, 4, 2, 16, 16, torch.float32, seed=0)
    q = torch.randn(2, 4, 16)
    args = (meta.block_tables, meta.seq_lens, 0.3)
    assert native.paged_decode(q, k_cache, v_cache, *args) is not None
    assert native.paged_decode(q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), *args) is None
    assert (
        native.paged_decode(torch.randn(4, 2, 16).transpose(0, 1), k_cache, v_cache, *args) is None
    )
    assert native.paged_decode(torch.randn(2, 3, 16), k_cache, v_cache, *args) is None  # 3 % 2
    assert native.paged_decode(q, k_cache, v_cache, meta.block_tables.long(), *args[1:]) is None


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The library not yet loaded, built into an empty cache."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_logged", set())
    monkeypatch.setenv("AFD_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_no_compiler_falls_back_once_logged(fresh_native, monkeypatch, caplog):
    monkeypatch.setattr(native, "COMPILER", "/nonexistent/gcc")
    w13, w2 = _moe_weights(4, 32, 24, torch.float32)
    x = torch.randn(6, 32)
    weights, ids = torch.rand(6, 4).topk(2, dim=-1)
    ref = torch_ops.fused_moe(x, w13, w2, weights, ids)
    for _ in range(2):
        assert native.fused_moe(x, w13, w2, weights, ids) is None
        torch.testing.assert_close(cpu_ops.fused_moe(x, w13, w2, weights, ids), ref, **TOL)
    assert sum("no C compiler" in r.getMessage() for r in caplog.records) == 1
    assert not list(fresh_native.rglob("*.so"))


def test_failed_build_falls_back(fresh_native, monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", (*native.SOURCES, bad))
    assert native.library() is None
    assert not list((fresh_native / "kernels").glob("*"))  # no partial library left behind


def test_disabled_by_env(monkeypatch):
    w13, w2 = _moe_weights(2, 16, 16, torch.float32)
    args = (torch.randn(2, 16), w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))
    assert native.fused_moe(*args) is not None
    monkeypatch.setenv("AFD_NATIVE_KERNELS", "0")
    assert native.fused_moe(*args) is None


def test_build_is_cached_and_quick(fresh_native):
    path = native.build()
    assert path.exists() and path.parent == fresh_native / "kernels"
    assert native._state["build_s"] < 60
    assert native.build() == path  # the second call finds it


def test_import_compiles_nothing(tmp_path):
    import subprocess
    import sys

    code = "import afd, afd.kernels.ops, afd.kernels.cpu_ops; from afd.kernels import native; "
    code += "print(native._state)"
    env = {"AFD_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{}" and not list(tmp_path.rglob("*.so"))


def test_bench_kernels_times_native_beside_cpu_and_torch(tmp_path):
    import json

    from test_kernels import _bench_args

    from afd.benchmarks import kernels as bench

    out = tmp_path / "kernels.json"
    args = _bench_args("--kernels", "fused_moe", "--threads", "1", "--output", str(out))
    assert bench.run(args) == 0
    report = json.loads(out.read_text())
    assert report["backends"] == ["native", "cpu", "torch"]
    rows = report["results"]
    assert [r["backend"] for r in rows] == ["native", "cpu", "torch"]
    assert all(r["check"]["passed"] for r in rows) and "speedup_vs_torch" in rows[0]


def test_engine_greedy_tokens_with_and_without_native(monkeypatch):
    """The engine's greedy tokens with the native kernels on (and called) equal those without
    them (tests/test_engine.py checks the native run against transformers)."""
    from afd import LLM, SamplingParams

    calls = []  # the native kernels that ran (not those that fell back)

    def counted(name):
        real = getattr(native, name)

        def run(*args):
            out = real(*args)
            if out is not None:
                calls.append(name)
            return out

        return run

    for name in ("fused_moe", "paged_decode"):
        monkeypatch.setattr(native, name, counted(name))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", "1, 2, 3,"]
    tokens = {}
    for on in (True, False):
        llm = LLM("tiny-qwen3-moe", dtype="float32", native_kernels=on)
        tokens[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert set(calls) == ({"fused_moe", "paged_decode"} if on else set())
        assert native.enabled() == on
        calls.clear()
    native.set_enabled(True)
    assert tokens[True] == tokens[False]

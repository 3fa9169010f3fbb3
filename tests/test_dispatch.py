"""Dispatch/combine with real spawned processes, M attention ranks and N expert ranks: over gloo
(torch transport) and over shared memory (shm transport), with activations sent in the compute
dtype and as FP8 (e4m3 + a float32 scale per token and 128 channels)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch

from afd.comm.dispatch import (
    exchange_tag,
    expert_split,
    get_transport,
    local_ids,
    pack_rows,
    resolve_transport_name,
    unpack_rows,
)
from afd.comm.net import free_port
from afd.kernels.torch_ops import fused_moe

HIDDEN, INTER, NUM_EXPERTS, TOP_K = 16, 8, 7, 3
NUM_LAYERS, NUM_MICRO_BATCHES = 2, 3
BF16_LAYER = NUM_LAYERS  # one extra exchange in bfloat16
BYTES_LAYER = NUM_LAYERS + 1  # every token routed to 2 experts of expert rank 0


def _weights(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + layer)
    w13 = torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.3  # [E, 2I, H]
    w2 = torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=g) * 0.3  # [E, H, I]
    return w13, w2


def _batch(attn: int, layer: int, mb: int, num_experts_hi: int = NUM_EXPERTS):
    """Inputs of one attention rank's micro-batch; identical in every process (seeded)."""
    g = torch.Generator().manual_seed(attn * 10_000 + layer * 100 + mb)
    # attention rank 0's micro-batch 1 is empty; sizes differ per rank
    num_tokens = 0 if (attn == 0 and mb == 1) else 3 + (attn * 5 + mb * 3 + layer) % 7
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    scores = torch.rand(num_tokens, num_experts_hi, generator=g)
    ids = scores.topk(TOP_K, dim=1).indices  # distinct experts per token
    if layer == 1 and mb == 2:
        # experts 4..6 only (the last shard when N = 2): expert rank 0 gets zero rows
        ids = scores[:, 4:].argsort(dim=1) + 4
    weights = torch.rand(num_tokens, TOP_K, generator=g)
    return x, ids, weights


BACKENDS = ("torch", "shm")
DISPATCH_DTYPES = ("auto", "fp8")


def _transport(backend, expert_ranks, ranges, rank, shm_dir, dispatch_dtype):
    from afd.comm.dist import get_combine_group

    # torch: the F->A direction on its own group, as workers do on NCCL
    return get_transport(
        backend, expert_ranks, ranges, "cpu", rank=rank, shm_dir=shm_dir,
        combine_group=get_combine_group(), dispatch_dtype=dispatch_dtype,
    )  # fmt: skip


def _as_sent(x: torch.Tensor, dispatch_dtype: str) -> torch.Tensor:
    """The rows an expert computes with: x, or x through e4m3 and back."""
    return unpack_rows(*pack_rows(x, dispatch_dtype), x.dtype)


def _attention_rank(rank, expert_ranks, ranges, num_attn, backend, shm_dir, dd) -> None:
    transport = _transport(backend, expert_ranks, ranges, rank, shm_dir, dd)
    weights = [_weights(layer) for layer in range(NUM_LAYERS + 1)]
    handles = {}
    # every exchange of every layer and micro-batch in flight before any combine
    for layer in range(NUM_LAYERS):
        for mb in range(NUM_MICRO_BATCHES):
            x, ids, w = _batch(rank, layer, mb)
            handles[layer, mb] = transport.dispatch(x, ids, w, exchange_tag(layer, mb))
    x16, ids16, w16 = _batch(rank, BF16_LAYER, 0)
    x16 = x16.to(torch.bfloat16)
    h16 = transport.dispatch(x16, ids16, w16, exchange_tag(BF16_LAYER, 0))
    # two experts of shard 0 per token (k = 2): each token must cross the wire once
    xb = torch.randn(5, HIDDEN)
    idsb = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 0], [1, 2]])
    wb = torch.rand(5, 2)
    hb = transport.dispatch(xb, idsb, wb, exchange_tag(BYTES_LAYER, 0))

    for (layer, mb), handle in reversed(handles.items()):
        x, ids, w = _batch(rank, layer, mb)
        out = transport.combine(handle)
        ref = fused_moe(_as_sent(x, dd), *weights[layer], w, ids)
        assert out.shape == (x.shape[0], HIDDEN) and out.dtype == x.dtype
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        expected_rows = [
            int((local_ids(ids, s, e) >= 0).any(1).sum()) for s, e in ranges
        ]  # a token crosses once per destination rank
        assert handle.rows_per_rank == expected_rows, (handle.rows_per_rank, expected_rows)
        if layer == 1 and mb == 2 and len(ranges) == 2:
            assert handle.rows_per_rank[0] == 0 and handle.rows_per_rank[1] == x.shape[0]

    out16 = transport.combine(h16)
    ref16 = fused_moe(_as_sent(x16, dd).float(), *weights[BF16_LAYER], w16, ids16)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref16, atol=3e-2, rtol=3e-2)

    outb = transport.combine(hb)
    assert ranges[0][1] >= 4  # experts 0..3 all live on expert rank 0
    assert hb.rows_per_rank == [5] + [0] * (len(ranges) - 1)  # 5 tokens, 10 routes
    header = 5 * 8 if backend == "torch" else 0  # shm: the header travels in the FIFO record
    # x fp32 + (ids | weight bits) int32; fp8: x e4m3 + (ids | weight bits | one scale) int32
    row_bytes = HIDDEN * 4 + 2 * 2 * 4 if dd == "auto" else HIDDEN + (2 * 2 + 1) * 4
    expected_bytes = header * len(ranges) + 5 * row_bytes
    assert hb.bytes_sent == expected_bytes, (hb.bytes_sent, expected_bytes)
    refb = fused_moe(_as_sent(xb, dd), *_weights(BYTES_LAYER), wb, idsb)
    torch.testing.assert_close(outb, refb, atol=1e-5, rtol=1e-5)
    transport.close()


def _expert_rank(rank, expert_ranks, ranges, num_attn, backend, shm_dir, dd) -> None:
    transport = _transport(backend, expert_ranks, ranges, rank, shm_dir, dd)
    start, end = ranges[expert_ranks.index(rank)]
    sources = list(range(num_attn))
    exchanges = [(layer, mb) for layer in range(NUM_LAYERS) for mb in range(NUM_MICRO_BATCHES)]
    exchanges += [(BF16_LAYER, 0), (BYTES_LAYER, 0)]
    for layer, mb in exchanges:
        w13, w2 = _weights(layer)
        batch = transport.receive(sources, exchange_tag(layer, mb))
        assert batch.sources == sources and len(batch.counts) == num_attn
        assert batch.x.shape[0] == sum(batch.counts) == batch.topk_ids.shape[0]
        assert bool(((batch.topk_ids >= -1) & (batch.topk_ids < end - start)).all())
        assert bool((batch.topk_ids >= 0).any(1).all()), "a row with no expert here was sent"
        if layer < NUM_LAYERS:  # the rows, back in the compute dtype, are the ones sent
            sent = []
            for src in sources:
                xs, ids, _ = _batch(src, layer, mb)
                sent.append(xs[(local_ids(ids, start, end) >= 0).any(1)])
            sent = torch.cat(sent)
            assert batch.x.dtype == sent.dtype
            # e4m3 keeps 3 mantissa bits: at most 2^-4 relative (plus the subnormal step)
            scale = sent.abs().amax(1, keepdim=True) / 448
            bound = sent.abs() * 2**-4 + scale * 2**-9 if dd == "fp8" else 0 * sent
            assert bool(((batch.x - sent).abs() <= bound).all())
            if dd == "fp8" and sent.numel():
                assert not torch.equal(batch.x, sent)  # it did travel as FP8
        x = batch.x.float()
        out = fused_moe(x, w13[start:end], w2[start:end], batch.topk_weights, batch.topk_ids)
        transport.send_back(batch, out.to(batch.x.dtype))
    transport.close()


TOPOLOGIES = [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)]  # (attention ranks M, expert ranks N)
MAX_ATTN, MAX_EXPERT = 3, 2  # one world serves every topology: process startup dominates


def _run_rank(rank: int, port: int, err_dir: str) -> None:
    # both backends, every topology, one world: process startup dominates
    import torch.distributed as dist

    from afd.comm.dist import destroy_world, init_world

    torch.set_num_threads(1)
    backend = topology = dd = None
    try:
        world = MAX_ATTN + MAX_EXPERT
        init_world(rank, world, "127.0.0.1", port, "gloo", "cpu", timeout_s=60, combine_group=True)
        runs = [(b, t, "auto") for b in BACKENDS for t in TOPOLOGIES]
        runs += [(b, t, "fp8") for b in BACKENDS for t in ((1, 2), (3, 2))]
        for backend, topology, dd in runs:
            num_attn, num_expert = topology
            # attention ranks 0..M-1, expert ranks MAX_ATTN..MAX_ATTN+N-1; the rest sit out
            expert_ranks = list(range(MAX_ATTN, MAX_ATTN + num_expert))
            ranges = expert_split(NUM_EXPERTS, num_expert)
            args = (rank, expert_ranks, ranges, num_attn, backend, err_dir, dd)
            if rank < num_attn:
                _attention_rank(*args)
            elif rank in expert_ranks:
                _expert_rank(*args)
            dist.barrier()
        destroy_world()
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{backend} (M, N) = {topology} {dd}, rank {rank}\n{traceback.format_exc()}")
        raise SystemExit(1) from None


@pytest.mark.slow
def test_dispatch_combine_matches_reference(tmp_path):
    """Every topology in TOPOLOGIES: combine == single-process fused_moe over all experts."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_run_rank, args=(r, port, str(tmp_path)))
        for r in range(MAX_ATTN + MAX_EXPERT)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [f.read_text() for f in sorted(tmp_path.glob("*.err"))]
    assert not errors, "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_local_ids_and_tags():
    ids = torch.tensor([[0, 3, 6], [2, 4, 5]])
    assert local_ids(ids, 3, 5).tolist() == [[-1, 0, -1], [-1, 1, -1]]
    assert exchange_tag(0, 0) == 0 and exchange_tag(2, 5) == 2 * 64 + 5
    with pytest.raises(ValueError):
        exchange_tag(0, 64)
    with pytest.raises(ValueError):
        get_transport("nope", [1], [(0, 4)], "cpu")
    assert get_transport("auto", [1], [(0, 4)], "cpu").name == "torch"  # no shared folder
    assert resolve_transport_name("auto", "cpu", "/dev/shm/x") == "shm"
    assert resolve_transport_name("auto", "cuda", "/dev/shm/x") == "torch"
    with pytest.raises(ValueError, match="CUDA"):
        get_transport("deepep", [1], [(0, 4)], "cpu", hidden_size=16, top_k=2)
    with pytest.raises(ValueError, match="contiguous"):
        get_transport("torch", [1, 2], [(0, 4), (5, 7)], "cpu")


def test_auto_never_picks_deepep(monkeypatch):
    """DeepEP has not run on a GPU and supports m = 1 only: `auto` passes it over even where
    `deep_ep` imports (CUDA, one GPU per worker); only `--comm-backend deepep` selects it."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "deep_ep", types.ModuleType("deep_ep"))
    for shm_dir in (None, "/dev/shm/x"):
        assert resolve_transport_name("auto", "cuda", shm_dir) == "torch"
    assert resolve_transport_name("deepep", "cuda", None) == "deepep"


def test_shm_slots_are_reused_grown_and_released(tmp_path):
    """Both ends in one process: a released slot is reused, a bigger message gets a larger
    segment (the old file is removed), records may be read out of order, a silent peer times
    out, and close removes every segment."""
    folder = str(tmp_path)
    attn = get_transport("shm", [1], [(0, 4)], "cpu", rank=0, shm_dir=folder)
    expert = get_transport("shm", [1], [(0, 4)], "cpu", rank=1, shm_dir=folder, timeout_s=0.2)
    assert attn.name == "shm"
    w13, w2 = torch.randn(4, 8, 16), torch.randn(4, 16, 4)

    def roundtrip(tokens: int, tag: int) -> None:
        x, ids = torch.randn(tokens, 16), torch.randint(0, 4, (tokens, 2))
        w = torch.rand(tokens, 2)
        handle = attn.dispatch(x, ids, w, tag)
        batch = expert.receive([0], tag)
        expert.send_back(batch, fused_moe(batch.x, w13, w2, batch.topk_weights, batch.topk_ids))
        torch.testing.assert_close(attn.combine(handle), fused_moe(x, w13, w2, w, ids))

    roundtrip(5, 0)
    roundtrip(7, 1)
    slots = sorted(os.listdir(folder))
    assert [f for f in slots if f.startswith("slot-0-1-")] == ["slot-0-1-0-0"], slots
    roundtrip(2000, 2)  # 2000 x 16 floats do not fit the first 64 KiB segment
    slots = sorted(f for f in os.listdir(folder) if f.startswith("slot-0-1-"))
    assert slots == ["slot-0-1-0-1"], slots

    # two exchanges in flight, expert answers in order, attention combines in reverse
    xs = [torch.randn(n, 16) for n in (3, 4)]
    ids = [torch.randint(0, 4, (n, 2)) for n in (3, 4)]
    ws = [torch.rand(n, 2) for n in (3, 4)]
    handles = [attn.dispatch(xs[i], ids[i], ws[i], 10 + i) for i in range(2)]
    for i in range(2):
        b = expert.receive([0], 10 + i)
        expert.send_back(b, fused_moe(b.x, w13, w2, b.topk_weights, b.topk_ids))
    for i in (1, 0):
        torch.testing.assert_close(
            attn.combine(handles[i]), fused_moe(xs[i], w13, w2, ws[i], ids[i])
        )

    with pytest.raises(TimeoutError, match="rank 0"):
        expert.receive([0], 99)
    with pytest.raises(ValueError, match="rank"):
        get_transport("shm", [1], [(0, 4)], "cpu")
    attn.close()
    expert.close()
    assert not [f for f in os.listdir(folder) if f.startswith("slot-")]


@pytest.mark.parametrize("staged", [False, True])
def test_shm_fp8_dispatch_in_one_process(tmp_path, staged):
    """FP8 rows through the shm segments, read in place (CPU) or copied out as GPU workers
    sharing one GPU do (`staged`, exercised here on CPU): the expert computes on the rows
    dequantized to the compute dtype named in the record, combine stays in that dtype."""
    folder = str(tmp_path)
    kw = dict(shm_dir=folder, dispatch_dtype="fp8")
    attn = get_transport("shm", [1, 2], [(0, 3), (3, 7)], "cpu", rank=0, **kw)
    experts = [get_transport("shm", [1, 2], [(0, 3), (3, 7)], "cpu", rank=r, **kw) for r in (1, 2)]
    for t in (attn, *experts):
        t.staged = staged
    w13, w2 = _weights(0)
    g = torch.Generator().manual_seed(9)
    for dtype, tokens in ((torch.bfloat16, 6), (torch.float32, 200)):
        x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
        ids = torch.rand(tokens, NUM_EXPERTS, generator=g).topk(TOP_K, dim=1).indices
        w = torch.rand(tokens, TOP_K, generator=g)
        handle = attn.dispatch(x, ids, w, 3)
        for rank, t in zip((1, 2), experts, strict=True):
            start, end = t.expert_ranges[rank - 1]
            b = t.receive([0], 3)
            assert b.x.dtype == dtype
            rows = (local_ids(ids, start, end) >= 0).any(1)
            torch.testing.assert_close(b.x, _as_sent(x[rows], "fp8"), atol=0, rtol=0)
            out = fused_moe(b.x.float(), w13[start:end], w2[start:end], b.topk_weights, b.topk_ids)
            t.send_back(b, out.to(dtype))
        got = attn.combine(handle)
        assert got.dtype == dtype
        want = fused_moe(_as_sent(x, "fp8").float(), w13, w2, w, ids)
        torch.testing.assert_close(got.float(), want, **({} if dtype == torch.float32 else
                                                         dict(atol=3e-2, rtol=3e-2)))  # fmt: skip
    for t in (attn, *experts):
        t.close()
    assert not [f for f in os.listdir(folder) if f.startswith("slot-")]


def test_cluster_layout_checks_the_comm_backend():
    import shutil
    from types import SimpleNamespace

    from afd.config import EngineConfig
    from afd.scheduler.cluster.executor import layout_for

    model = SimpleNamespace(n_routed_experts=4)
    topology = dict(num_attention_workers=1, num_expert_workers=1)
    two_nodes = dict(nnodes=2, dist_init_addr="127.0.0.1:29999", **topology)
    with pytest.raises(ValueError, match="one node"):
        layout_for(EngineConfig.from_flat(model="m", comm_backend="shm", **two_nodes), model)
    with pytest.raises(ValueError, match="unknown comm backend"):
        layout_for(EngineConfig.from_flat(model="m", comm_backend="nccl-please", **topology), model)
    assert layout_for(EngineConfig.from_flat(model="m", **two_nodes), model).shm is None
    # one node: shm folder
    layout = layout_for(EngineConfig.from_flat(model="m", **topology), model)
    try:
        assert layout.shm and os.path.isdir(layout.shm)
    finally:
        shutil.rmtree(layout.shm, ignore_errors=True)
        shutil.rmtree(layout.ipc, ignore_errors=True)


def test_every_gpu_worker_of_a_node_gets_its_own_gpu():
    from afd.scheduler.cluster.executor import ClusterLayout, node_devices, parse_node_roles

    one = ClusterLayout(2, 2, 1)
    assert node_devices(one, 0, "cpu", 0) == dict.fromkeys(range(5), "cpu")
    assert node_devices(one, 0, "cuda", 8) == {r: f"cuda:{r}" for r in range(5)}
    with pytest.raises(ValueError, match="5 workers on node 0 need one GPU each, but it has 1;"):
        node_devices(one, 0, "cuda", 1)
    # two nodes: attention and prefill on node 0, experts on node 1; each node counts from 0
    two = ClusterLayout(2, 3, 1, nnodes=2, node_roles=parse_node_roles(None, 2))
    assert node_devices(two, 0, "cuda", 4) == {0: "cuda:0", 1: "cuda:1", 5: "cuda:2"}
    assert node_devices(two, 1, "cuda", 4) == {2: "cuda:0", 3: "cuda:1", 4: "cuda:2"}


def test_workers_share_gpus_when_asked(builtin_path):
    """--gpus-per-node G: a node's workers take cuda:0..G-1 round-robin; a cluster where some GPU
    runs several workers forms its world over gloo (NCCL allows no two ranks on one GPU) and
    moves the data plane through host memory (shm on one node, torch over gloo across nodes)."""
    import shutil

    from afd.comm.dispatch import resolve_transport_name
    from afd.config import EngineConfig, ModelConfig
    from afd.scheduler.cluster.executor import (
        ClusterLayout,
        layout_for,
        node_devices,
        parse_node_roles,
        shares_gpus,
        worker_spec,
    )

    one = ClusterLayout(2, 2, 1)  # 1P + 2A + 2F on one node
    assert node_devices(one, 0, "cuda", 1, gpus_per_node=1) == dict.fromkeys(range(5), "cuda:0")
    assert node_devices(one, 0, "cuda", 8, gpus_per_node=2) == {
        0: "cuda:0", 1: "cuda:1", 2: "cuda:0", 3: "cuda:1", 4: "cuda:0"
    }  # fmt: skip
    with pytest.raises(ValueError, match="--gpus-per-node 2, but node 0 has 1 GPUs"):
        node_devices(one, 0, "cuda", 1, gpus_per_node=2)
    two = ClusterLayout(2, 2, 0, nnodes=2, node_roles=parse_node_roles(None, 2))
    cfg = dict(device="cuda", num_attention_workers=2, num_expert_workers=2)
    assert not shares_gpus(EngineConfig.from_flat(**cfg), two)  # default: one GPU per worker
    # 2 workers per node
    assert not shares_gpus(EngineConfig.from_flat(gpus_per_node=2, **cfg), two)
    assert shares_gpus(EngineConfig.from_flat(gpus_per_node=1, **cfg), two)
    assert not shares_gpus(EngineConfig.from_flat(gpus_per_node=1, **{**cfg, "device": "cpu"}), two)
    assert resolve_transport_name("auto", "cuda", "/dev/shm/x", shared_gpus=True) == "shm"
    assert resolve_transport_name("auto", "cuda", None, shared_gpus=True) == "torch"
    with pytest.raises(ValueError, match="one GPU per worker"):
        resolve_transport_name("deepep", "cuda", None, shared_gpus=True)

    path = builtin_path("tiny-qwen3-moe")
    model = ModelConfig.from_pretrained(path)
    config = EngineConfig.from_flat(model=str(path), gpus_per_node=1, num_prefill_workers=1, **cfg)
    layout = layout_for(config, model)
    try:
        spec = worker_spec(config, path, model, layout)
        assert spec.dist_backend == "gloo" and spec.comm_backend == "shm"
        assert spec.gpus_per_node == 1
        own = EngineConfig.from_flat(model=str(path), comm_backend="torch", **cfg)
        spec = worker_spec(own, path, model, layout)
        assert spec.dist_backend == "auto" and spec.comm_backend == "torch"
    finally:
        shutil.rmtree(layout.shm, ignore_errors=True)
        shutil.rmtree(layout.ipc, ignore_errors=True)
    with pytest.raises(ValueError, match="at least 1"):
        layout_for(EngineConfig.from_flat(model="m", gpus_per_node=0, **cfg), model)

"""CPU fast paths (backend `cpu`): the torch references' math in a few large ops per call.

Each function has the signature and result of its torch_ops reference (tests/test_cpu_kernels.py
checks them against it); ops.py picks them for CPU tensors under `auto` and `cpu`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from afd.kernels import native, torch_ops
from afd.kernels.metadata import AttentionMetadata

# A group of sequences padded to its longest costs at most this many times its real work
# (query rows x keys) before the next length starts a group of its own.
PAD_WASTE = 1.5
# MoE experts whose busiest expert has at most this many rows run as one padded bmm whatever the
# padding (decode: each expert's weights are read once either way, and one bmm is one parallel
# region where torch._grouped_mm on CPU is one mm per expert).
MOE_PAD_ROWS = 16
# Decode gathers a batch's pages once (still 1.5x the reference's page-column loop at 4 x 4096
# tokens of 8 x 128 heads, 67 MB); above this many bytes the copy would hold too much memory
# and the reference runs instead.
DECODE_GATHER_BYTES = 512 << 20
# Native decode keeps a KV head's scaled queries in L1 while its keys stream past; wider ones
# (MLA's 16 heads of 576, 36 KB) ran no faster than the torch path, which they keep
# (kernels-cpu-native-attention.json of eb569ee).
NATIVE_DECODE_QUERY_BYTES = 16 << 10

Gather = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """torch's fused RMSNorm kernel in float32 (one pass instead of five), weight applied in
    x's dtype as transformers does."""
    if residual is not None:
        x = x + residual
        residual = x
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    y = weight * h
    return y if residual is None else (y, residual)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], shard-local; out-of-range ids are skipped
) -> torch.Tensor:
    """The native kernel (kernels/native.py: fp32) where it applies, else fused_moe_torch."""
    out = native.fused_moe(x, w13, w2, topk_weights, topk_ids)
    return out if out is not None else fused_moe_torch(x, w13, w2, topk_weights, topk_ids)


def fused_moe_torch(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], shard-local; out-of-range ids are skipped
) -> torch.Tensor:
    """(token, slot) pairs sorted by expert, both projections as one grouped GEMM each (_padded
    or _grouped, by _use_padded), SiLU-and-mul on the whole batch, each token's k terms added."""
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    # Skipped ids sort last, as one extra expert whose rows are never computed.
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    routed = int(counts.sum()) if num_experts else 0
    if routed == 0:
        return torch.zeros_like(x)
    pairs = order[:routed]
    tok = pairs // top_k
    rows = x.index_select(0, tok)
    most, active = int(counts.max()), int(torch.count_nonzero(counts))
    if _use_padded(num_experts, most, routed, active):
        h = _padded(rows, w13, w2, counts, key.index_select(0, pairs), most)
    else:
        h = _grouped(rows, w13, w2, torch.cumsum(counts, 0).to(torch.int32))
    h.mul_(topk_weights.reshape(-1)[pairs].to(x.dtype)[:, None])
    # Each token's k terms summed in ascending expert order, as the reference does: in bf16 a
    # different order rounds differently, and the engine's greedy tests see it.
    rank = torch.argsort(torch.argsort(key.view(-1, top_k), dim=1, stable=True), dim=1)
    terms = x.new_zeros(x.shape[0] * top_k, x.shape[1])
    terms[tok * top_k + rank.reshape(-1)[pairs]] = h
    terms = terms.view(x.shape[0], top_k, -1).unbind(1)
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def _use_padded(num_experts: int, most: int, routed: int, active: int) -> bool:
    """Padded bmm when the busiest expert has at most MOE_PAD_ROWS rows (the weights' reads
    dominate) and the empty experts whose weights bmm would read too are at most PAD_WASTE x the
    active ones (one token of top-4 of 16 ran 0.70x padded). Larger groups keep _grouped: 2048
    tokens ran 0.78x padded even with little padding (kernels-cpu.json of 06cfd89)."""
    return most <= MOE_PAD_ROWS and num_experts <= PAD_WASTE * active


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up over [..., 2I] in two in-place passes (no copy of either half)."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter], inplace=True).mul_(gate_up[..., inter:])


def _grouped(
    rows: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """Expert-sorted rows [R, H] through torch._grouped_mm (a GEMM per group) -> [R, H]."""
    act = _silu_mul(torch._grouped_mm(rows, w13.transpose(1, 2), offs=ends))
    return torch._grouped_mm(act, w2.transpose(1, 2), offs=ends)


def _padded(
    rows: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    counts: torch.Tensor,  # [E] rows per expert
    experts: torch.Tensor,  # [R] expert of each sorted row
    most: int,
) -> torch.Tensor:
    """Expert-sorted rows [R, H] padded to [E, most, H], one bmm per projection -> [R, H]."""
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.shape[0], device=rows.device) - starts[experts]
    xp = rows.new_zeros(w13.shape[0], most, rows.shape[1])
    xp[experts, pos] = rows
    act = _silu_mul(torch.bmm(xp, w13.transpose(1, 2)))
    return torch.bmm(act, w2.transpose(1, 2))[experts, pos]


def _length_groups(q_lens: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Sequences with queries, longest context first, cut into groups whose padded work
    (size x longest query x longest context) stays within PAD_WASTE x their real work."""
    order = sorted((b for b, q in enumerate(q_lens) if q), key=lambda b: -seq_lens[b])
    groups: list[list[int]] = []
    real = qmax = 0
    for b in order:
        q, s = q_lens[b], seq_lens[b]
        if groups:
            group = groups[-1]
            smax, qm = seq_lens[group[0]], max(qmax, q)
            if (len(group) + 1) * qm * smax <= PAD_WASTE * (real + q * s):
                group.append(b)
                real, qmax = real + q * s, qm
                continue
        groups.append([b])
        real, qmax = q * s, q
    return groups


def _decode(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [n, S, Hkv, D] gathered pages
    v: torch.Tensor,  # [n, S, Hkv, Dv]
    lens: torch.Tensor,  # [n]
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its gathered keys as one SDPA in fp32 like the reference:
    the G query heads of a KV head are its G query rows, keys past each sequence's length
    masked. One SDPA read the strided pages in place and ran 1.3-5x the former bmm per KV head
    at 1-2 KV heads (16-64 streams, one thread), where the per-head calls were op overhead."""
    n, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    f32 = torch.float32
    if k.dtype != f32:
        k, v = k.float(), v.float()
    seen = torch.arange(s, device=q.device) < lens[:, None]  # [n, S] keys to see
    o = F.scaled_dot_product_attention(
        q.to(f32).view(n, hkv, hq // hkv, d),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=seen[:, None, None],
        scale=scale,
    )  # [n, Hkv, G, Dv]
    return o.reshape(n, hq, -1).to(q.dtype)


def _prefill(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [n, S, Hkv, D] gathered pages
    v: torch.Tensor,  # [n, S, Hkv, Dv]
    q_lens: torch.Tensor,  # [n]
    starts: torch.Tensor,  # [n] first row of each sequence in q
    ctx: torch.Tensor,  # [n] cached tokens before each sequence's queries
    qmax: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SDPA over the group's queries padded to Qmax rows, causal from each sequence's cached
    length -> (output rows [t, Hq, Dv], their rows in q [t]). The G query heads that share a KV
    head are folded into the query rows ([n, Hkv, G * Qmax, D]), so no head's keys are copied."""
    n, s, hkv, dev = k.shape[0], k.shape[1], k.shape[2], q.device
    hq, d = q.shape[1], q.shape[2]
    g = hq // hkv
    rows = torch.repeat_interleave(torch.arange(n, device=dev), q_lens)  # [t] sequence of a row
    within = torch.arange(rows.shape[0], device=dev) - (torch.cumsum(q_lens, 0) - q_lens)[rows]
    src, dst = starts[rows] + within, rows * qmax + within
    qp = q.new_zeros(n * qmax, hq, d)
    qp[dst] = q[src]
    qp = qp.view(n, qmax, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, g * qmax, d)
    # Padded query rows see keys too (no all -inf row); their outputs are dropped.
    qpos = ctx[:, None] + torch.arange(qmax, device=dev)  # [n, Qmax]
    mask = torch.arange(s, device=dev) <= qpos[:, :, None]  # [n, Qmax, S]
    mask = mask[:, None].expand(n, g, qmax, s).reshape(n, 1, g * qmax, s)
    o = F.scaled_dot_product_attention(
        qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [n, Hkv, G * Qmax, Dv]
    o = o.view(n, hkv, g, qmax, -1).permute(0, 3, 1, 2, 4).reshape(n * qmax, hq, o.shape[-1])
    return o[dst], src


def _varlen_attention(
    q: torch.Tensor, dv: int, meta: AttentionMetadata, gather: Gather, scale: float
) -> torch.Tensor:
    """Causal varlen attention of q [T, Hq, D] over paged keys, a few ops per length group:
    one gather of the group's pages, then _decode (every query length 1) or _prefill."""
    groups = _group_inputs(meta)
    if len(groups) == 1 and groups[0][6]:  # decode of the whole batch in its own order
        cols, length, _, lens, _, _, _ = groups[0]
        return _decode(q, *gather(cols, length), lens, scale)
    out = q.new_empty(q.shape[0], q.shape[1], dv)
    for cols, length, starts, lens, ql, qmax, _ in groups:
        k, v = gather(cols, length)
        if qmax == 1:
            out[starts] = _decode(q.index_select(0, starts), k, v, lens, scale)
        else:
            rows, src = _prefill(q, k, v, ql.long(), starts, (lens - ql).long(), qmax, scale)
            out[src] = rows
    return out


def _group_inputs(meta: AttentionMetadata) -> list[tuple]:
    """Per length group: its block tables (int64, the gather's index), longest context, first
    query rows, KV lengths, query lengths, longest query, and whether it is a decode of the
    whole batch in order. The same for every layer of a forward, so built once (the metadata
    keeps it)."""
    groups = meta.derived.get("cpu_length_groups")
    if groups is None:
        q_lens, seq_lens = meta.query_lens.tolist(), meta.seq_lens.tolist()
        groups = []
        tables = meta.block_tables.long()
        for group in _length_groups(q_lens, seq_lens):
            group.sort()  # the batch's own order: a whole-batch group needs no row shuffles
            qmax = max(q_lens[b] for b in group)
            whole = qmax == 1 and len(group) == len(q_lens) == meta.slot_mapping.shape[0]
            idx = torch.tensor(group, device=meta.seq_lens.device)
            groups.append((
                tables.index_select(0, idx),
                max(seq_lens[b] for b in group),
                meta.query_start_loc.index_select(0, idx).long(),
                meta.seq_lens.index_select(0, idx),
                meta.query_lens.index_select(0, idx),
                qmax,
                whole,
            ))  # fmt: skip
        meta.derived["cpu_length_groups"] = groups
    return groups


def _pages(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """[N, bs, ...] pages of n sequences (int64 tables) -> [n, length, ...] (one gather for the
    whole group)."""
    bs = cache.shape[1]
    cols = tables[:, : -(-length // bs)]
    pages = cache.index_select(0, cols.reshape(-1))
    return pages.view(cols.shape[0], -1, *cache.shape[2:])[:, :length]


def _gather_too_big(meta: AttentionMetadata, *caches: torch.Tensor) -> bool:
    """Would decode gather more than DECODE_GATHER_BYTES (the whole batch at its longest)?"""
    row = sum(c[0, 0].numel() * c.element_size() for c in caches)
    return meta.is_decode and meta.num_seqs * meta.max_seq_len * row > DECODE_GATHER_BYTES


def _native_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """The native decode kernel (pages read in place; kernels/native.py) for a decode batch,
    else None."""
    if not meta.is_decode or q.shape[0] != meta.num_seqs:
        return None
    group = q.shape[1] // max(k_cache.shape[2], 1)
    if group * q.shape[2] * q.element_size() > NATIVE_DECODE_QUERY_BYTES:
        return None
    return native.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache, decode and prefill alike."""
    out = _native_decode(q, k_cache, v_cache, meta, scale)
    if out is not None:
        return out
    if _gather_too_big(meta, k_cache, v_cache):
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale)

    def gather(tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _pages(k_cache, tables, length), _pages(v_cache, tables, length)

    return _varlen_attention(q, v_cache.shape[-1], meta, gather, scale)


def mla_attention(
    q_latent: torch.Tensor,  # [T, Hq, L]
    q_rope: torch.Tensor,  # [T, Hq, R]
    kv_cache: torch.Tensor,  # [N, bs, L + R]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA: one KV head, K = [latent, rope key], V = K's latent part (gathered once)."""
    latent = q_latent.shape[-1]
    if meta.is_decode:
        k = kv_cache[:, :, None]  # [N, bs, 1, L + R]
        q = torch.cat([q_latent, q_rope], dim=-1)
        out = _native_decode(q, k, k[..., :latent], meta, scale)
        if out is not None:
            return out
    if _gather_too_big(meta, kv_cache):
        return torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, scale)

    def gather(tables: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = _pages(kv_cache, tables, length)[:, :, None]  # [n, S, 1, L + R]
        return k, k[..., :latent]

    q = torch.cat([q_latent, q_rope], dim=-1)
    return _varlen_attention(q, latent, meta, gather, scale)


CPU_IMPLS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "fused_moe": fused_moe,
    "paged_attention": paged_attention,
    "mla_attention": mla_attention,
}


def _without_native(fn: Callable) -> Callable:
    def run(*args):
        with native.disabled():
            return fn(*args)

    return run


# The fast paths without native code (what `afd bench kernels` times as its cpu rows).
TORCH_IMPLS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "fused_moe": fused_moe_torch,
    "paged_attention": _without_native(paged_attention),
    "mla_attention": _without_native(mla_attention),
}
# With the native kernels (the bench's native rows): fused_moe always native (raises where it
# would fall back), attention native at decode and the torch fast path at prefill.
NATIVE_IMPLS: dict[str, Callable] = {
    "fused_moe": native.fused_moe_or_raise,
    "paged_attention": paged_attention,
    "mla_attention": mla_attention,
}

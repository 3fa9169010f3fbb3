"""Pure-torch reference kernels: the CPU path and the ground truth for the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd.models.metadata import AttentionMetadata


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in float32 like transformers; with `residual`, normalises x + residual too."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(dtype)
    return y if residual is None else (y, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], shard-local; out-of-range ids are skipped
) -> torch.Tensor:
    """Grouped loop over the experts that received tokens; out-of-range ids contribute zero."""
    num_experts = w13.shape[0]
    out = torch.zeros_like(x)
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    if not bool(valid.any()):
        return out
    weights = topk_weights.to(x.dtype)
    for e in torch.unique(topk_ids[valid]).tolist():
        tok, slot = torch.where(topk_ids == e)
        h = silu_and_mul(x[tok] @ w13[e].t()) @ w2[e].t()  # [t_e, H]
        out.index_add_(0, tok, h * weights[tok, slot, None])
    return out


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D] (or [T, D] for MLA)
    k_cache: torch.Tensor,  # [N, bs, Hkv, D] (or [N, bs, D])
    slot_mapping: torch.Tensor,  # [T]
    v: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
) -> None:
    """Write new keys (and values) into their paged cache slots."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    if v is not None and v_cache is not None:
        v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[N, bs, ...] pages of one sequence -> [length, ...]."""
    pages = cache.index_select(0, block_table.long())  # [M, bs, ...]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache (new tokens must already be stored)."""
    if meta.is_decode and q.shape[0] == meta.num_seqs:
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    starts = meta.query_start_loc.tolist()
    for b, seq_len in enumerate(meta.seq_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        if e == s:
            continue
        k = _gather_pages(k_cache, meta.block_tables[b], seq_len).transpose(0, 1)  # [Hkv, S, D]
        v = _gather_pages(v_cache, meta.block_tables[b], seq_len).transpose(0, 1)
        q_len = e - s
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos[:, None]  # [q, S]
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k, v, attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[s:e] = o.transpose(0, 1)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    block_tables: torch.Tensor,  # [B, M]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:
    """One query per sequence against its pages, one block column at a time: a column of pages
    ([B, bs, ...]) stays in cache while it is used, where copying every sequence's whole context
    out first tripled the memory traffic (and slowed the other core's work as much)."""
    bsz, hq, d = q.shape
    bs, hkv, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    tables = block_tables.long()
    m = tables.shape[1]
    f32 = torch.float32  # scores and sums in fp32 whatever the cache dtype, like SDPA
    g = hq // hkv
    qg = q.view(bsz, hkv, g, d).to(f32) * scale  # [B, Hkv, G, D]
    scores = torch.empty(bsz, hkv, g, m * bs, dtype=f32, device=q.device)  # [B, Hkv, G, S]
    # One bmm per (column, KV head): a head's [B, bs, D] slice of the gathered pages is a
    # strided matrix BLAS reads in place; a matmul over all heads at once copied it first.
    for j in range(m):
        k = k_cache.index_select(0, tables[:, j]).to(f32)  # [B, bs, Hkv, D]
        for h in range(hkv):
            scores[:, h, :, j * bs : (j + 1) * bs] = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2))
    mask = torch.arange(m * bs, device=q.device)[None, :] < seq_lens[:, None].long()  # [B, S]
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.zeros(bsz, hkv, g, dv, dtype=f32, device=q.device)  # [B, Hkv, G, Dv]
    for j in range(m):
        v = v_cache.index_select(0, tables[:, j]).to(f32)  # [B, bs, Hkv, Dv]
        for h in range(hkv):
            out[:, h] += torch.bmm(probs[:, h, :, j * bs : (j + 1) * bs], v[:, :, h])
    return out.view(bsz, hq, dv).to(q.dtype)


def mla_attention(
    q_latent: torch.Tensor,  # [T, Hq, L]
    q_rope: torch.Tensor,  # [T, Hq, R]
    kv_cache: torch.Tensor,  # [N, bs, L + R]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA: multi-query attention with K = [latent, rope key], V = latent."""
    latent = q_latent.shape[-1]
    q = torch.cat([q_latent, q_rope], dim=-1)
    k_cache = kv_cache.unsqueeze(2)  # [N, bs, 1, L + R]
    v_cache = kv_cache[..., :latent].unsqueeze(2)  # [N, bs, 1, L]
    return paged_attention(q, k_cache, v_cache, meta, scale)


def rotary_embedding(
    q: torch.Tensor,  # [T, Hq, d]
    k: torch.Tensor,  # [T, Hk, d]
    cos: torch.Tensor,  # [T, d/2] (any YaRN attention factor already folded in)
    sin: torch.Tensor,  # [T, d/2]
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k; interleaved pairs (x0, x1), (x2, x3) come out de-interleaved (dots agree)."""
    cos, sin = cos.reshape(cos.shape[0], 1, -1), sin.reshape(sin.shape[0], 1, -1)  # [T, 1, d/2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)

"""Pure-torch reference kernels: the CPU path and the ground truth for the Triton kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd.kernels.metadata import AttentionMetadata


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


# ---- FP8 (e4m3, block scales) ---------------------------------------------------------------
# The format of DeepSeek-V3's and Qwen3's FP8 checkpoints: a float8_e4m3fn tensor and one float32
# scale per block (`weight_scale_inv`: value = fp8 * scale). Weights use [128, 128] blocks;
# activations are quantized on the fly per token and 128 channels ("dynamic", block [1, 128]).

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_MIN_AMAX = 1e-10  # an all-zero block gets a tiny scale instead of a division by zero


def quant_fp8_blocks(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], float32 scales [ceil(M/bm), ceil(K/bk)]): max |x| of each block
    maps to the largest e4m3 value; partial edge blocks are scaled by their own max."""
    bm, bk = block
    m, k = x.shape
    mb, kb = -(-m // bm), -(-k // bk)
    padded = F.pad(x.float(), (0, kb * bk - k, 0, mb * bm - m))
    amax = padded.view(mb, bm, kb, bk).abs().amax(dim=(1, 3))  # [Mb, Kb]
    scale = amax.clamp(min=FP8_MIN_AMAX) / FP8_MAX
    q = (x.float() / expand_blocks(scale, block, (m, k))).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def expand_blocks(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]):
    """Per-block scales [Mb, Kb] -> one value per element [M, K]."""
    bm, bk = block
    full = scale.repeat_interleave(bm, dim=0).repeat_interleave(bk, dim=1)
    return full[: shape[0], : shape[1]]


def dequant_fp8(
    q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype=torch.float32
) -> torch.Tensor:
    """fp8 [M, K] with block scales -> dtype [M, K] (through float32)."""
    return (q.float() * expand_blocks(scale.float(), block, tuple(q.shape))).to(dtype)


def quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [T, K] -> (fp8 [T, K], scales [T, ceil(K/group)])."""
    return quant_fp8_blocks(x, (1, group))


def quant_fp8_experts(
    w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked experts w13 [E, 2I, H], w2 [E, H, I] -> (w13 fp8, w13 scales [E, 2 Ib, Hb] (gate
    blocks, then up blocks), w2 fp8, w2 scales [E, Hb, Ib]): what the loader builds from a
    checkpoint's per-expert FP8 tensors."""
    inter = w13.shape[1] // 2

    def stack(ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [quant_fp8_blocks(w, block) for w in ws]
        return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])

    gq, gs = stack(w13[:, :inter])
    uq, us = stack(w13[:, inter:])
    dq, ds = stack(w2)
    return torch.cat([gq, uq], 1), torch.cat([gs, us], 1), dq, ds


def fp8_linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [ceil(N/bn), ceil(K/bk)] float32
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T with x quantized per token and bk channels, as the FP8 GEMM computes it."""
    xq, xs = quant_fp8(x, block[1])
    out = dequant_fp8(xq, xs, (1, block[1])) @ dequant_fp8(weight, scale, block).t()  # [T, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] float8_e4m3fn
    w13_scale: torch.Tensor,  # [E, 2 * ceil(I/bn), ceil(H/bk)]: gate blocks, then up blocks
    w2: torch.Tensor,  # [E, H, I] float8_e4m3fn
    w2_scale: torch.Tensor,  # [E, ceil(H/bn), ceil(I/bk)]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] shard-local; out-of-range ids are skipped
    block: tuple[int, int],
) -> torch.Tensor:
    """fused_moe with block-FP8 experts: both GEMMs take activations quantized per token and bk
    channels (the input, then the SiLU-and-mul output), rounded to x's dtype where the Triton
    kernel rounds."""
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    gate_blocks = -(-inter // block[0])
    dtype = x.dtype
    out = torch.zeros_like(x)
    valid = (topk_ids >= 0) & (topk_ids < num_experts)
    if not bool(valid.any()):
        return out
    xq, xs = quant_fp8(x, block[1])
    xd = dequant_fp8(xq, xs, (1, block[1]))  # [T, H] float32
    weights = topk_weights.to(dtype)
    for e in torch.unique(topk_ids[valid]).tolist():
        tok, slot = torch.where(topk_ids == e)
        gate = dequant_fp8(w13[e, :inter], w13_scale[e, :gate_blocks], block)
        up = dequant_fp8(w13[e, inter:], w13_scale[e, gate_blocks:], block)
        g = (xd[tok] @ gate.t()).to(dtype).float()
        u = (xd[tok] @ up.t()).to(dtype).float()
        act = (F.silu(g).to(dtype).float() * u).to(dtype)  # [t_e, I]
        aq, as_ = quant_fp8(act, block[1])
        h = dequant_fp8(aq, as_, (1, block[1])) @ dequant_fp8(w2[e], w2_scale[e], block).t()
        out.index_add_(0, tok, h.to(dtype) * weights[tok, slot, None])
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

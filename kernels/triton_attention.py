"""Paged decode attention in Triton: GQA/MHA (any query-to-KV head ratio) and absorbed MLA, one
query token per sequence, block tables, per-sequence lengths, optional split-K with a log-sum-exp
merge. Prefill batches go to the torch reference; flash-attn serves GQA decode where it fits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from afd.kernels import torch_ops
from afd.kernels.metadata import AttentionMetadata
from afd.kernels.triton_utils import INTERPRET, cast_to, check_tensor, next_pow2


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    qr_ptr,
    k_ptr,
    kr_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    scale,
    group_size,
    head_blocks,
    block_size,
    dim_k,
    dim_r,
    dim_v,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_qrb,
    stride_qrh,
    stride_kn,
    stride_kt,
    stride_kh,
    stride_vn,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    HEADS_FASTEST: tl.constexpr,
):
    # HEADS_FASTEST (MLA with several head blocks): the head blocks of one sequence are adjacent
    # in the launch order, so they run together and stream the same latent pages: one read from
    # memory, cache hits for the other head blocks (instead of one full read per head block).
    if HEADS_FASTEST:
        seq = tl.program_id(1).to(tl.int64)
        head_block = tl.program_id(0)
    else:
        seq = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
    kv_head = head_block // head_blocks
    head_in_group = (head_block % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = head_in_group < group_size
    heads = (kv_head * group_size + head_in_group).to(tl.int64)  # [BH] query heads
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    offs_v = tl.arange(0, BLOCK_DV)
    d_mask, r_mask, v_mask = offs_d < dim_k, offs_r < dim_r, offs_v < dim_v
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BH, BD]
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_ROPE:
        qr = tl.load(
            qr_ptr + seq * stride_qrb + heads[:, None] * stride_qrh + offs_r[None, :],
            mask=h_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BH, BR]
        if UPCAST:
            qr = qr.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        page = tl.load(
            block_tables_ptr + seq * stride_bt + pos // block_size, mask=p_mask, other=0
        ).to(tl.int64)
        k_base = page * stride_kn + (pos % block_size) * stride_kt + kv_head * stride_kh  # [BN]
        v_base = page * stride_vn + (pos % block_size) * stride_vt + kv_head * stride_vh
        k = tl.load(
            k_ptr + k_base[:, None] + offs_d[None, :],
            mask=p_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
        s = _dot(q, tl.trans(k), IEEE)  # [BH, BN]
        if HAS_ROPE:
            kr = tl.load(
                kr_ptr + k_base[:, None] + offs_r[None, :],
                mask=p_mask[:, None] & r_mask[None, :],
                other=0.0,
            )  # [BN, BR]
            if UPCAST:
                kr = kr.to(tl.float32)
            s += _dot(qr, tl.trans(kr), IEEE)
        s = tl.where(p_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + v_base[:, None] + offs_v[None, :],
            mask=p_mask[:, None] & v_mask[None, :],
            other=0.0,
        )  # [BN, BDV]
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    # An empty split (sequence shorter than its start) leaves l_i = 0: output 0, lse = -inf.
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os
    tl.store(
        o_ptrs + offs_v[None, :],
        cast_to(o, out_ptr.dtype.element_ty),
        mask=h_mask[:, None] & v_mask[None, :],
    )
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    dim_v,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_v = tl.arange(0, BLOCK_DV)
    s_mask, v_mask = offs_s < num_splits, offs_v < dim_v
    lse = tl.load(
        lse_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )  # [BS]
    w = tl.exp(lse - tl.max(lse, axis=0))  # empty splits weigh exp(-inf) = 0
    part = tl.load(
        partial_ptr
        + seq * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_v[None, :],
        mask=s_mask[:, None] & v_mask[None, :],
        other=0.0,
    )  # [BS, BDV]
    o = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + offs_v,
        cast_to(o, out_ptr.dtype.element_ty),
        mask=v_mask,
    )


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_num_splits(programs: int, max_seq_len: int, device: torch.device) -> int:
    """Split long contexts until the grid fills the GPU twice over; never below 256 tokens each."""
    if INTERPRET or not device.type == "cuda":
        return 1
    want = triton.cdiv(2 * _num_sms(device), max(1, programs))
    return max(1, min(want, triton.cdiv(max_seq_len, 256), 32))


@dataclass(frozen=True)
class _DecodeTiling:
    """Head block, KV block and split-K partition of one paged decode launch."""

    block_h: int
    head_blocks: int
    block_n: int
    num_splits: int
    tokens_per_split: int
    big: bool  # head dims over 256: smaller KV blocks, more warps


def _decode_tiling(
    q: torch.Tensor,
    num_kv_heads: int,
    dim_v: int,
    max_seq_len: int,
    num_splits: int | None,
    block_n: int | None,
    block_h: int | None,
) -> _DecodeTiling:
    bsz, num_heads, dim_k = q.shape
    group = num_heads // num_kv_heads
    block_h = block_h or max(16, min(64, next_pow2(group)))
    head_blocks = triton.cdiv(group, block_h)
    big = max(dim_k, dim_v) > 256
    block_n = block_n or (32 if big else 64)
    if num_splits is None:
        num_splits = _pick_num_splits(bsz * num_kv_heads * head_blocks, max_seq_len, q.device)
    num_splits = max(1, min(num_splits, triton.cdiv(max(1, max_seq_len), block_n)))
    tokens_per_split = triton.cdiv(triton.cdiv(max(1, max_seq_len), num_splits), block_n) * block_n
    return _DecodeTiling(block_h, head_blocks, block_n, num_splits, tokens_per_split, big)


def _launch_paged_decode(
    t: _DecodeTiling, q, q_rope, k, k_rope, v, block_tables, seq_lens, o_target, o_strides, lse,
    scale: float,
) -> None:  # fmt: skip
    bsz, num_heads, dim_k = q.shape
    num_kv_heads, dim_v = k.shape[2], v.shape[-1]
    dim_r = q_rope.shape[-1] if q_rope is not None else 0
    split = t.num_splits > 1
    qr = q_rope if q_rope is not None else q
    kr = k_rope if k_rope is not None else k
    gpu_opts = {} if INTERPRET else {"num_warps": 8 if t.big else 4, "num_stages": 2}
    heads_fastest = num_kv_heads == 1 and t.head_blocks > 1
    rows = num_kv_heads * t.head_blocks
    grid = (rows, bsz) if heads_fastest else (bsz, rows)
    _paged_decode_kernel[(*grid, t.num_splits)](
        q,
        qr,
        k,
        kr,
        v,
        block_tables,
        seq_lens,
        o_target,
        lse,
        float(scale),
        num_heads // num_kv_heads,
        t.head_blocks,
        k.shape[1],
        dim_k,
        dim_r,
        dim_v,
        t.tokens_per_split,
        q.stride(0),
        q.stride(1),
        qr.stride(0),
        qr.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        block_tables.stride(0),
        *o_strides,
        lse.stride(0) if split else 0,
        lse.stride(1) if split else 0,
        BLOCK_H=t.block_h,
        BLOCK_N=t.block_n,
        BLOCK_D=max(16, next_pow2(dim_k)),
        BLOCK_R=max(16, next_pow2(max(1, dim_r))),
        BLOCK_DV=max(16, next_pow2(dim_v)),
        HAS_ROPE=q_rope is not None,
        SPLIT=split,
        UPCAST=INTERPRET or q.dtype == torch.float32,
        IEEE=q.dtype == torch.float32 and not INTERPRET,
        HEADS_FASTEST=heads_fastest,
        **gpu_opts,
    )


def _launch_merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    bsz, num_heads, num_splits, dim_v = partial.shape
    _merge_splits_kernel[(bsz, num_heads)](
        partial,
        lse,
        out,
        num_splits,
        dim_v,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_S=max(2, next_pow2(num_splits)),
        BLOCK_DV=max(16, next_pow2(dim_v)),
    )


def _decode(
    q: torch.Tensor,  # [B, Hq, D]
    q_rope: torch.Tensor | None,  # [B, Hq, R]
    k: torch.Tensor,  # [N, bs, Hkv, D] (a view: the K part of the cache)
    k_rope: torch.Tensor | None,  # [N, bs, Hkv, R], same strides as k
    v: torch.Tensor,  # [N, bs, Hkv, Dv]
    block_tables: torch.Tensor,  # [B, M]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    max_seq_len: int | None,
    num_splits: int | None,
    block_n: int | None,
    block_h: int | None,
) -> torch.Tensor:
    bsz, num_heads, _ = q.shape
    num_kv_heads, dim_v = k.shape[2], v.shape[-1]
    out = torch.empty(bsz, num_heads, dim_v, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if q_rope is not None and q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    t = _decode_tiling(q, num_kv_heads, dim_v, max_seq_len, num_splits, block_n, block_h)
    split = t.num_splits > 1
    if split:
        f32 = dict(dtype=torch.float32, device=q.device)
        partial = torch.empty(bsz, num_heads, t.num_splits, dim_v, **f32)
        lse = torch.empty(bsz, num_heads, t.num_splits, **f32)
        o_target, o_strides = partial, (partial.stride(0), partial.stride(1), partial.stride(2))
    else:
        lse = out  # unused
        o_target, o_strides = out, (out.stride(0), out.stride(1), 0)
    args = (q, q_rope, k, k_rope, v, block_tables, seq_lens, o_target, o_strides, lse, scale)
    _launch_paged_decode(t, *args)
    if split:
        _launch_merge_splits(partial, lse, out)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    block_tables: torch.Tensor,  # [B, M]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """GQA/MHA decode (one query per sequence) -> [B, Hq, Dv]; num_splits > 1 forces split-K."""
    check_tensor(q, "paged_attention")
    return _decode(
        q, None, k_cache, None, v_cache, block_tables, seq_lens, scale,
        max_seq_len, num_splits, block_n, None,
    )  # fmt: skip


def mla_decode_attention(
    q_latent: torch.Tensor,  # [B, Hq, L]
    q_rope: torch.Tensor,  # [B, Hq, R]
    kv_cache: torch.Tensor,  # [N, bs, L + R]
    block_tables: torch.Tensor,  # [B, M]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    block_h: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: all heads against the shared latent + rope key -> [B, Hq, L]."""
    check_tensor(q_latent, "mla_attention")
    latent = q_latent.shape[-1]
    cache = kv_cache.unsqueeze(2)  # [N, bs, 1, L + R]: one shared KV head
    return _decode(
        q_latent, q_rope, cache[..., :latent], cache[..., latent:], cache[..., :latent],
        block_tables, seq_lens, scale, max_seq_len, num_splits, block_n, block_h or 16,
    )  # fmt: skip


def _flash_attn_decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """flash-attn's paged decode when installed and the cache layout fits it, else None."""
    if not q.is_cuda or os.environ.get("AFD_USE_FLASH_ATTN", "1") == "0":
        return None
    # flash-attn needs half precision, equal K/V head dims and pages of a multiple of 256.
    if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.shape[1] % 256 != 0:
        return None
    if q.shape[-1] != v_cache.shape[-1]:
        return None
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    o = flash_attn_with_kvcache(
        q.unsqueeze(1),  # [B, 1, Hq, D]
        k_cache,
        v_cache,
        cache_seqlens=meta.seq_lens,
        block_table=meta.block_tables,
        softmax_scale=scale,
        causal=True,
    )
    return o[:, 0]


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """ops.paged_attention: Triton (or flash-attn) for decode; prefill uses the torch reference."""
    if not (meta.is_decode and q.shape[0] == meta.num_seqs):
        return torch_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    o = _flash_attn_decode(q, k_cache, v_cache, meta, scale)
    if o is not None:
        return o
    return paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len
    )


def mla_attention(
    q_latent: torch.Tensor,  # [T, Hq, L]
    q_rope: torch.Tensor,  # [T, Hq, R]
    kv_cache: torch.Tensor,  # [N, bs, L + R]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """ops.mla_attention: Triton for decode; prefill uses the torch reference."""
    if not (meta.is_decode and q_latent.shape[0] == meta.num_seqs):
        return torch_ops.mla_attention(q_latent, q_rope, kv_cache, meta, scale)
    return mla_decode_attention(
        q_latent, q_rope, kv_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len
    )

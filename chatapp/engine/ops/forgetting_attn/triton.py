"""Forgetting attention in Triton: a flash-style prefill kernel and a decode kernel over the cache.

Same arguments and result as `naive.forgetting_attn_naive` (README.md). Checked against it in
tests/engine/ops/test_forgetting_attn.py, on CPU under TRITON_INTERPRET=1 and on CUDA where present.

Both kernels read keys at their own head count (query head h loads key head h // (H / Hk)), keep the
running max, normaliser and output of the online softmax in fp32 registers, and add the gate bias
c_i - c_j from the fp32 cumulative sums before the max. Dot products are IEEE fp32: the bias differences
are small next to c itself, and TF32 would blur the scores they are added to.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["forgetting_attn_chunk", "forgetting_attn_step"]


@triton.jit
def _forgetting_attn_fwd_kernel(q, k, v, c, o, scale, T, L, H,
                                sq_b, sq_t, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sc_b, sc_h, so_b, so_t, so_h,
                                REP_K: tl.constexpr, REP_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    m_m = o_m < T
    pos = L - T + o_m  # cache position of each query row
    b_q = tl.load(q + i_b * sq_b + o_m[:, None] * sq_t + i_h * sq_h + o_d[None, :],
                  mask=m_m[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)
    b_cq = tl.load(c + i_b * sc_b + i_h * sc_h + pos, mask=m_m, other=0.0)
    k_base = k + i_b * sk_b + (i_h // REP_K) * sk_h
    v_base = v + i_b * sv_b + (i_h // REP_V) * sv_h
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    # Keys past the block's last query are never visible: stop there.
    hi = tl.minimum(L - T + (i_m + 1) * BM, L)
    for start in range(0, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < hi
        b_k = tl.load(k_base + o_n[None, :] * sk_l + o_d[:, None], mask=m_n[None, :] & (o_d[:, None] < D),
                      other=0.0).to(tl.float32)  # [BD, BN]
        b_ck = tl.load(c + i_b * sc_b + i_h * sc_h + o_n, mask=m_n, other=0.0)
        s = tl.dot(b_q, b_k, input_precision="ieee") * scale + (b_cq[:, None] - b_ck[None, :])
        # Key 0 is visible to every row, so no row is ever fully masked (no NaN from -inf - -inf).
        s = tl.where((o_n[None, :] <= pos[:, None]) & m_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        b_v = tl.load(v_base + o_n[:, None] * sv_l + o_dv[None, :], mask=m_n[:, None] & (o_dv[None, :] < DV),
                      other=0.0).to(tl.float32)  # [BN, BDV]
        acc = acc * alpha[:, None] + tl.dot(p, b_v, input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o + i_b * so_b + o_m[:, None] * so_t + i_h * so_h + o_dv[None, :], acc.to(o.dtype.element_ty),
             mask=m_m[:, None] & (o_dv[None, :] < DV))


@triton.jit
def _forgetting_attn_step_kernel(q, k, v, c, o, scale, L, H,
                                 sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sc_b, sc_h, so_b, so_h,
                                 REP_K: tl.constexpr, REP_V: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                 BD: tl.constexpr, BDV: tl.constexpr, BN: tl.constexpr):
    # One query per (batch, head): a vector-matrix product, so no tl.dot and no 16-row padding.
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_d, o_dv = tl.arange(0, BD), tl.arange(0, BDV)
    b_q = tl.load(q + i_b * sq_b + i_h * sq_h + o_d, mask=o_d < D, other=0.0).to(tl.float32) * scale
    b_cq = tl.load(c + i_b * sc_b + i_h * sc_h + L - 1)
    k_base = k + i_b * sk_b + (i_h // REP_K) * sk_h
    v_base = v + i_b * sv_b + (i_h // REP_V) * sv_h
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BDV], tl.float32)
    for start in range(0, L, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < L
        b_k = tl.load(k_base + o_n[:, None] * sk_l + o_d[None, :], mask=m_n[:, None] & (o_d[None, :] < D),
                      other=0.0).to(tl.float32)  # [BN, BD]
        b_ck = tl.load(c + i_b * sc_b + i_h * sc_h + o_n, mask=m_n, other=0.0)
        s = tl.where(m_n, tl.sum(b_k * b_q[None, :], axis=1) + (b_cq - b_ck), float("-inf"))  # [BN]
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        b_v = tl.load(v_base + o_n[:, None] * sv_l + o_dv[None, :], mask=m_n[:, None] & (o_dv[None, :] < DV),
                      other=0.0).to(tl.float32)  # [BN, BDV]
        acc = acc * alpha + tl.sum(p[:, None] * b_v, axis=0)
        m_i = m_new
    tl.store(o + i_b * so_b + i_h * so_h + o_dv, (acc / l_i).to(o.dtype.element_ty), mask=o_dv < DV)


def _prepare(q, k, v, c):
    """Kernels index the last dimension of every tensor (and c's L) with stride 1; copy only if needed."""
    h = q.shape[2]
    if h % k.shape[1] or h % v.shape[1]:
        raise ValueError(f"forgetting_attn: {h} query heads cannot share {k.shape[1]} key / {v.shape[1]} value heads")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    c = c if c.dtype == torch.float32 and c.stride(-1) == 1 else c.float().contiguous()
    return q, k, v, c


def forgetting_attn_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                          scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill: q [B, T, H, D] over k [B, Hk, L, D], v [B, Hv, L, Dv], c [B, H, L] -> [B, T, H, Dv]."""
    q, k, v, c = _prepare(q, k, v, c)
    b, t, h, d = q.shape
    length, dv = k.shape[2], v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    o = out if out is not None else torch.empty(b, t, h, dv, device=q.device, dtype=v.dtype)
    bm, bn = 32, 32
    grid = (triton.cdiv(t, bm), b * h)
    _forgetting_attn_fwd_kernel[grid](
        q, k, v, c, o, scale, t, length, h,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), c.stride(0), c.stride(1), o.stride(0), o.stride(1), o.stride(2),
        REP_K=h // k.shape[1], REP_V=h // v.shape[1], D=d, DV=dv,
        BD=max(16, triton.next_power_of_2(d)), BDV=max(16, triton.next_power_of_2(dv)), BM=bm, BN=bn)
    return o


def forgetting_attn_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                         scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode: q [B, 1, H, D] over the whole cache (its own token last) -> [B, 1, H, Dv]."""
    q, k, v, c = _prepare(q, k, v, c)
    b, t, h, d = q.shape
    if t != 1:
        return forgetting_attn_chunk(q, k, v, c, scale, out)
    length, dv = k.shape[2], v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    o = out if out is not None else torch.empty(b, 1, h, dv, device=q.device, dtype=v.dtype)
    _forgetting_attn_step_kernel[(b * h,)](
        q, k, v, c, o, scale, length, h,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        c.stride(0), c.stride(1), o.stride(0), o.stride(2),
        REP_K=h // k.shape[1], REP_V=h // v.shape[1], D=d, DV=dv,
        BD=triton.next_power_of_2(d), BDV=triton.next_power_of_2(dv), BN=64)
    return o

"""Gated linear attention in Triton: a chunked prefill kernel and a fused recurrent decode kernel.

Same math, signatures and state layout as `naive.gla_naive` (README.md). Checked against `gla_naive`
in tests/engine/ops/test_gla.py, on CPU under TRITON_INTERPRET=1 and on CUDA where one is present.

Both kernels run one program per (V block, batch x head) and keep that head's [K, BV] slice of the state
in registers from the first token to the last, so the state is read and written once per call. Gates,
cumulative sums, the state and every dot product are fp32 (`input_precision="ieee"`: TF32 would blur the
state over long prompts). Per-head gates [B, T, H] load through a zero stride on K, so one kernel serves both
gate shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gla_chunk", "gla_step"]

#: Tokens per chunk in the prefill kernel (tl.dot needs at least 16).
CHUNK = 16


@triton.jit
def _gla_chunk_fwd_kernel(q, k, v, g, s_in, s_out, o, scale, T, H, K, V, G_HK, G_K,
                          HAS_INIT: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_INIT:
        s = tl.load(s_in + p_s, mask=m_kv, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    causal = o_t[:, None] >= o_t[None, :]
    for i_t in range(0, tl.cdiv(T, BT)):
        t = i_t * BT + o_t
        m_t = t < T
        row = (i_b * T + t) * H + i_h  # [BT] index of (b, t, h)
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + row[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + row[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
        # Padded rows get g = 0 (no decay) and k = v = 0, so the tail chunk needs no special case.
        b_g = tl.load(g + row[:, None] * G_HK + o_k[None, :] * G_K, mask=m_tk, other=0.0).to(tl.float32)
        b_b = tl.cumsum(b_g, axis=0)  # [BT, BK] inclusive log decay inside the chunk
        acc = tl.dot(b_q * tl.exp(b_b), s, input_precision="ieee")  # contribution of the carried state
        # Intra-chunk scores column by column with the pairwise exponent b_t - b_s <= 0 (never exp(-b_s)).
        att = tl.zeros([BT, BT], dtype=tl.float32)
        for j in tl.static_range(BT):
            sel = o_t[:, None] == j
            k_j = tl.sum(tl.where(sel, b_k, 0.0), axis=0)  # [BK]
            b_j = tl.sum(tl.where(sel, b_b, 0.0), axis=0)
            expo = tl.where(o_t[:, None] >= j, b_b - b_j[None, :], float("-inf"))
            col = tl.sum(b_q * k_j[None, :] * tl.exp(expo), axis=1)  # [BT]
            att = tl.where(o_t[None, :] == j, col[:, None], att)
        att = tl.where(causal, att, 0.0)
        acc += tl.dot(att, b_v, input_precision="ieee")
        tl.store(o + row[:, None] * V + o_v[None, :], (acc * scale).to(o.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        b_last = tl.sum(tl.where(o_t[:, None] == BT - 1, b_b, 0.0), axis=0)  # [BK]
        k_dec = b_k * tl.exp(b_last[None, :] - b_b)
        s = s * tl.exp(b_last)[:, None] + tl.dot(tl.trans(k_dec), b_v, input_precision="ieee")
    tl.store(s_out + p_s, s, mask=m_kv)


@triton.jit
def _gla_step_kernel(q, k, v, g, s_in, s_out, o, scale, T, H, K, V, G_HK, G_K,
                     HAS_INIT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_s = i_bh * K * V + o_k[:, None] * V + o_v[None, :]
    if HAS_INIT:
        s = tl.load(s_in + p_s, mask=m_kv, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for t in range(0, T):
        row = (i_b * T + t) * H + i_h
        b_q = tl.load(q + row * K + o_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + row * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + row * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        b_g = tl.load(g + row * G_HK + o_k * G_K, mask=m_k, other=0.0).to(tl.float32)
        s = s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(o + row * V + o_v, tl.sum(s * b_q[:, None], axis=0).to(o.dtype.element_ty), mask=m_v)
    # Each program owns its [K, BV] slice, so writing back over s_in (in-place decode) is race-free.
    tl.store(s_out + p_s, s, mask=m_kv)


def _prepare(q, k, v, g, scale, initial_state, out_state):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    per_head = g.dim() == 3
    g_hk, g_k = (1, 0) if per_head else (dk, 1)
    if out_state is None:
        out_state = torch.empty(b, h, dk, dv, device=q.device, dtype=torch.float32)
    if not (out_state.dtype == torch.float32 and out_state.is_contiguous() and out_state.shape == (b, h, dk, dv)):
        raise ValueError(f"out_state must be a contiguous fp32 [{b}, {h}, {dk}, {dv}] tensor")
    s_in = initial_state
    if s_in is not None and not (s_in.dtype == torch.float32 and s_in.is_contiguous()):
        s_in = s_in.float().contiguous()
    o = torch.empty_like(v)
    bk = max(16, triton.next_power_of_2(dk))
    bv = min(64, max(16, triton.next_power_of_2(dv)))
    grid = (triton.cdiv(dv, bv), b * h)
    args = (q, k, v, g, out_state if s_in is None else s_in, out_state, o, scale, t, h, dk, dv, g_hk, g_k)
    return grid, args, dict(HAS_INIT=s_in is not None, BK=bk, BV=bv), o, out_state


def gla_chunk(q, k, v, g, scale=None, initial_state=None):
    """Chunked prefill; see naive.gla_naive for shapes. Returns (o in v's dtype, final state fp32)."""
    grid, args, meta, o, s = _prepare(q, k, v, g, scale, initial_state, None)
    _gla_chunk_fwd_kernel[grid](*args, BT=CHUNK, **meta)
    return o, s


def gla_step(q, k, v, g, scale=None, initial_state=None, out_state=None):
    """Fused recurrent step (decode; any T). With `out_state` the final state is written into it, which
    may be `initial_state` itself (in place)."""
    grid, args, meta, o, s = _prepare(q, k, v, g, scale, initial_state, out_state)
    _gla_step_kernel[grid](*args, **meta)
    return o, s

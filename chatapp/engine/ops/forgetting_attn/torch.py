"""Forgetting attention in vectorised PyTorch: the CPU path (prefill over a cache, and the decode step).

Same arguments and result as `naive.forgetting_attn_naive` (see README.md). Checked against it in
tests/engine/ops/test_forgetting_attn.py (odd lengths, chunks appended to a cache, GQA, bf16).

Keys stay at their own head count: query heads are grouped per key head, so the cache is never
expanded. Scores, the gate bias and the softmax are fp32. Prefill computes entirely in fp32; the decode
step multiplies in the cache's dtype and casts the probabilities to it for the value product, as flash
attention does.
"""
from __future__ import annotations

import torch

__all__ = ["forgetting_attn_chunk", "forgetting_attn_step"]

#: Queries per block in prefill: bounds the [B, H, QBLOCK, L] score tensor.
QBLOCK = 256


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * q . k for every query head against its key head: [B, H, T, L] fp32."""
    b, t, h, d = q.shape
    hk, length = k.shape[1], k.shape[2]
    qg = q.transpose(1, 2).reshape(b, hk, (h // hk) * t, d)  # head h = hk * rep + r
    s = torch.matmul(qg, k.transpose(-1, -2)).float()  # [B, Hk, rep * T, L]
    return s.view(b, h, t, length) * scale


def _apply(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p [B, H, T, L] times v [B, Hv, L, Dv] per value head -> [B, T, H, Dv]."""
    b, h, t, length = p.shape
    hv = v.shape[1]
    o = torch.matmul(p.to(v.dtype).reshape(b, hv, (h // hv) * t, length), v)
    return o.view(b, h, t, -1).transpose(1, 2)


def forgetting_attn_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """Prefill: q [B, T, H, D] over k [B, Hk, L, D], v [B, Hv, L, Dv], c [B, H, L] -> [B, T, H, Dv]."""
    b, t, h, d = q.shape
    length = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    # CPU bf16 matmuls with many rows are several times slower than fp32 ones (and less exact): upcast.
    q, k, v, c = q.float(), k.float(), v.float(), c.float()
    outs = []
    for start in range(0, t, QBLOCK):
        end = min(start + QBLOCK, t)
        # Query i of this block sits at cache position length - t + i; it sees keys up to there.
        hi = length - t + end
        s = _scores(q[:, start:end], k[:, :, :hi], scale)
        pos = torch.arange(length - t + start, hi, device=q.device)
        future = torch.arange(hi, device=q.device)[None, :] > pos[:, None]  # [Tq, hi]
        bias = (c[:, :, length - t + start:hi, None] - c[:, :, None, :hi]).masked_fill(future, float("-inf"))
        outs.append(_apply((s + bias).softmax(-1), v[:, :, :hi]))
    return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]).to(out_dtype)


def forgetting_attn_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Decode: one new query per head (T = 1) over the whole cache, which ends with its own token."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    c = c.float()
    s = _scores(q, k, scale) + (c[:, :, -1:, None] - c[:, :, None, :])  # [B, H, 1, L]
    return _apply(s.softmax(-1), v)

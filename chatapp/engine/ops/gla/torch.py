"""Gated linear attention in vectorised PyTorch: the CPU path (chunked prefill and the decode step).

Same math and signatures as `naive.gla_naive` (see README.md). Checked against `gla_naive` in
tests/engine/ops/test_gla.py (outputs and final state, non-zero initial state, odd lengths, bf16).

`gla_chunk` works on chunks of up to 16 tokens. Gates, their cumulative sums and the carried state stay in
fp32. The decay between two positions is always formed as exp(b_t - b_s) with b_t - b_s <= 0, never as
exp(b_t) * exp(-b_s): g = logsigmoid(f) is unbounded below and exp(-b_s) would overflow within a few tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gla_chunk", "gla_step"]

# Measured on CPU (B=1, H=6, K=V=128): 16-token chunks of 4-token sub-chunks beat 64/16 by 2-3x at T=128-512.
CHUNK = 16
SUB = 4


def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
             initial_state: torch.Tensor | None = None,
             out_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token (decode; T is normally 1).

    `out_state` (fp32 [B, H, K, V]) receives the final state in place and is returned; passing the same
    tensor as `initial_state` and `out_state` updates a preallocated state without any new allocation
    of its size. Without `out_state` a new state tensor is returned.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    if out_state is None:
        out_state = torch.zeros(b, h, dk, dv, device=q.device, dtype=torch.float32)
        if initial_state is not None:
            out_state.copy_(initial_state)
    elif initial_state is None:
        out_state.zero_()
    elif initial_state is not out_state:
        out_state.copy_(initial_state)
    s = out_state
    decay = g.float().exp()
    if decay.dim() == 3:
        decay = decay.unsqueeze(-1)  # one decay per head, broadcast over K
    kf, vf, qf = k.float(), v.float(), q.float() * scale
    outs = []
    for i in range(t):
        s.mul_(decay[:, i].unsqueeze(-1)).addcmul_(kf[:, i].unsqueeze(-1), vf[:, i].unsqueeze(-2))
        outs.append(qf[:, i].unsqueeze(-2) @ s)  # [B, H, 1, V]
    o = outs[0] if t == 1 else torch.cat(outs, dim=2)
    return o.transpose(1, 2).to(v.dtype), s


def gla_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked prefill. q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] or [B, T, H] (log decay <= 0).

    Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V] in fp32.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    per_head = g.dim() == 3
    # Chunks of at most CHUNK tokens, a multiple of SUB so they split into whole sub-chunks.
    c = min(CHUNK, -(-t // SUB) * SUB)
    n = -(-t // c)
    pad = n * c - t
    # Padded positions carry q = k = v = 0 and g = 0: they add nothing to the state and do not decay it.
    qf, kf, vf, gf = (F.pad(x.float(), (0, 0) * (x.dim() - 3) + (0, 0, 0, pad)) for x in (q, k, v, g))
    # [B, T, H, *] -> [B, H, N, C, *]
    qf, kf, vf = (x.transpose(1, 2).reshape(b, h, n, c, -1) for x in (qf, kf, vf))
    gf = gf.transpose(1, 2).reshape(b, h, n, c, *(() if per_head else (dk,)))
    bcum = gf.cumsum(3)  # inclusive cumulative log decay inside each chunk
    if per_head:
        attn = _intra_per_head(qf, kf, bcum)
        bk = bcum.unsqueeze(-1)  # [B, H, N, C, 1]
    else:
        attn = _intra_per_channel(qf, kf, bcum)
        bk = bcum
    o = attn @ vf  # [B, H, N, C, V]
    # Each chunk's own contribution to the state, decayed to the chunk's end (exponents <= 0).
    b_end = bk[:, :, :, -1:]  # [B, H, N, 1, K|1]
    k_end = kf * (b_end - bk).exp()
    upd = k_end.transpose(-1, -2) @ vf  # [B, H, N, K, V]
    d_end = b_end.squeeze(3).exp()  # [B, H, N, K|1]
    s = torch.zeros(b, h, dk, dv, device=q.device) if initial_state is None else initial_state.float().clone()
    starts = []
    for i in range(n):
        starts.append(s)
        s = s * d_end[:, :, i].unsqueeze(-1) + upd[:, :, i]
    s_start = torch.stack(starts, dim=2)  # [B, H, N, K, V], the state entering each chunk
    o = o + (qf * bk.exp()) @ s_start
    o = (o * scale).reshape(b, h, n * c, dv)[:, :, :t].transpose(1, 2)
    return o.to(v.dtype), s


def _intra_per_head(q: torch.Tensor, k: torch.Tensor, bcum: torch.Tensor) -> torch.Tensor:
    """A[t, s] = (q_t . k_s) exp(b_t - b_s) for s <= t; bcum [B, H, N, C] (one decay per head)."""
    c = q.shape[3]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    diff = (bcum.unsqueeze(-1) - bcum.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    return (q @ k.transpose(-1, -2)) * diff.exp()


def _intra_per_channel(q: torch.Tensor, k: torch.Tensor, bcum: torch.Tensor) -> torch.Tensor:
    """A[t, s] = sum_i q_t[i] k_s[i] exp(b_t[i] - b_s[i]) for s <= t; bcum [B, H, N, C, K].

    Pairs in different sub-chunks factor through a reference point r between them (the
    position just before t's sub-chunk): exp(b_t - r) and exp(r - b_s) are both <= 1, so the product is a
    matmul with no overflow. Pairs inside one sub-chunk use the pairwise exponent directly.
    """
    bsz, h, n, c, dk = q.shape
    m = c // SUB
    qs = q.view(bsz, h, n, m, SUB, dk)
    bs = bcum.view(bsz, h, n, m, SUB, dk)
    # Reference of sub-chunk j: b just before its first position (0 for the first sub-chunk).
    ref = F.pad(bs[:, :, :, :-1, -1], (0, 0, 1, 0))  # [B, H, N, M, K]
    q_ref = qs * (bs - ref.unsqueeze(-2)).exp()  # [B, H, N, M, SUB, K]
    pos = torch.arange(c, device=q.device)
    earlier = pos.view(1, c) < (torch.arange(m, device=q.device) * SUB).view(m, 1)  # [M, C]: s before sub-chunk j
    expo = (ref.unsqueeze(-2) - bcum.unsqueeze(3)).masked_fill(~earlier.unsqueeze(-1), float("-inf"))
    k_ref = k.unsqueeze(3) * expo.exp()  # [B, H, N, M, C, K]
    inter = (q_ref @ k_ref.transpose(-1, -2)).reshape(bsz, h, n, c, c)
    causal = torch.ones(SUB, SUB, dtype=torch.bool, device=q.device).tril()
    diff = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill(~causal.unsqueeze(-1), float("-inf"))
    ks = k.view(bsz, h, n, m, SUB, dk)
    diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * diff.exp()).sum(-1)  # [B, H, N, M, SUB, SUB]
    for j in range(m):
        inter[..., j * SUB:(j + 1) * SUB, j * SUB:(j + 1) * SUB] = diag[:, :, :, j]
    return inter

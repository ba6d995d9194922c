"""Gated linear attention, the oracle: a plain loop over time in fp32.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t        S: [B, H, K, V]
    o_t = scale * q_t S_t

g is the log of the per-key-channel decay ([B, T, H, K]: HGRN2/OdinNext), or one decay per head
([B, T, H]: Genesis's GDN layers), broadcast over K.
"""
from __future__ import annotations

import torch


def gla_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float | None = None,
              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K] or [B, T, H] (log decay, <= 0);
    initial_state [B, H, K, V] or None. Returns o [B, T, H, V] in v's dtype and the final state
    [B, H, K, V] in fp32."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = dk ** -0.5 if scale is None else scale
    if g.dim() == 3:
        g = g.unsqueeze(-1).expand(b, t, h, dk)
    qf, kf, vf, gf = (x.float() for x in (q, k, v, g))
    s = torch.zeros(b, h, dk, dv) if initial_state is None else initial_state.float().clone()
    s = s.to(q.device)
    o = torch.empty(b, t, h, dv, device=q.device)
    for i in range(t):
        s = s * gf[:, i].exp().unsqueeze(-1) + kf[:, i].unsqueeze(-1) * vf[:, i].unsqueeze(-2)
        o[:, i] = torch.einsum("bhk,bhkv->bhv", qf[:, i] * scale, s)
    return o.to(v.dtype), s

"""Forgetting attention (FoX), the oracle: one query at a time, everything in fp32.

    s_ij = scale * q_i . k_j + c_i - c_j     for j <= pos(i), -inf after
    o_i  = softmax_j(s_ij) @ v_j

c is the running sum of log forget gates (c_t = sum_{s<=t} log f_s), so c_i - c_j sums the gates of
the tokens after j up to and including i (f_j itself is excluded; the diagonal bias is 0).
"""
from __future__ import annotations

import torch


def forgetting_attn_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """T new queries over a cache of L positions whose last T are the queries' own tokens.

    Args:
        q: [B, T, H, D] queries.
        k: [B, Hk, L, D] keys (cache layout); query head h reads key head h // (H / Hk).
        v: [B, Hv, L, Dv] values; query head h reads value head h // (H / Hv).
        c: [B, H, L] cumulative log forget gates at every cached position (fp32).
        scale: score scale, D^-1/2 by default.
    Returns:
        o [B, T, H, Dv] in v's dtype.
    """
    b, t, h, d = q.shape
    length = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kf = k.float().repeat_interleave(h // k.shape[1], dim=1)  # [B, H, L, D]
    vf = v.float().repeat_interleave(h // v.shape[1], dim=1)  # [B, H, L, Dv]
    cf = c.float()
    o = torch.empty(b, t, h, v.shape[-1], device=q.device)
    for i in range(t):
        pos = length - t + i
        s = torch.einsum("bhd,bhld->bhl", q[:, i].float() * scale, kf[:, :, :pos + 1])
        s = s + cf[:, :, pos:pos + 1] - cf[:, :, :pos + 1]
        o[:, i] = torch.einsum("bhl,bhld->bhd", s.softmax(-1), vf[:, :, :pos + 1])
    return o.to(v.dtype)

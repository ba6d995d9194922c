"""RMSNorm glue, the oracle: fp32 math with the rounding points of the models' own code spelled out.

    s = x + gate * delta                         (the residual add; gate optional, scalar or per channel)
    y = cast(s * rsqrt(mean(s^2) + eps)) * w'    w' = cast(1 + w) when zero-centred, else w
    o = y * cast(silu(g))                        (the gated output norm)

Each "cast" rounds to the activation dtype where the models' PyTorch code does, so the oracle is the same
function in bf16 as in fp32 (layers.rms_norm: the weight multiplies after the cast back).
"""
from __future__ import annotations

import torch


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """x [..., D]; weight [D] or [W, D] (row r of x, flattened over its leading dims, takes weight row r % W)."""
    d = x.shape[-1]
    rows = x.reshape(-1, d).float()
    w = weight.reshape(-1, d)
    if zero_centered:
        w = (1.0 + w.float()).to(weight.dtype)
    w = w.float().repeat(rows.shape[0] // w.shape[0], 1)
    y = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        r = rows[i]
        y[i] = (r / torch.sqrt((r * r).sum() / d + eps)).to(x.dtype).float() * w[i]
    return y.to(_out_dtype(x, weight)).reshape(x.shape)


def add_rms_norm_naive(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                       zero_centered: bool = False, gate: torch.Tensor | None = None):
    """(s, rms_norm(s)) with s = x + gate * delta in x's dtype; gate [1] or [D] (None: 1)."""
    g = 1.0 if gate is None else gate.float()
    s = (x.float() + g * delta.float()).to(x.dtype)
    return s, rms_norm_naive(s, weight, eps, zero_centered)


def rms_norm_gated_naive(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x) * silu(gate); gate has x's shape."""
    y = rms_norm_naive(x, weight, eps)
    gf = gate.float()
    act = (gf / (1.0 + torch.exp(-gf))).to(gate.dtype)
    return (y.float() * act.float()).to(torch.promote_types(y.dtype, gate.dtype))

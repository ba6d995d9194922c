"""RMSNorm glue in Triton: one program per row fuses the residual add (optionally gated), the norm, the weight
(optionally zero-centred) and a SiLU output gate, reading each input once and writing each output once.

Same math and rounding points as `naive.py` (each value is rounded to the activation dtype where the PyTorch
path rounds it), checked against it in tests/engine/ops/test_norm.py, on CPU under TRITON_INTERPRET=1 and on
CUDA where one is present. The sum of squares is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_gated"]


@triton.jit
def _norm_kernel(x, delta, rgate, s_out, w, g, o, D, W_ROWS, RG_STRIDE, eps,
                 HAS_DELTA: tl.constexpr, HAS_RGATE: tl.constexpr, ZERO_CENTERED: tl.constexpr,
                 HAS_GATE: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BD)
    m = cols < D
    p = row * D + cols
    xv = tl.load(x + p, mask=m, other=0.0).to(tl.float32)
    if HAS_DELTA:
        dv = tl.load(delta + p, mask=m, other=0.0).to(tl.float32)
        if HAS_RGATE:
            dv = dv * tl.load(rgate + cols * RG_STRIDE, mask=m, other=0.0).to(tl.float32)
        s = (xv + dv).to(s_out.dtype.element_ty)
        tl.store(s_out + p, s, mask=m)
        xv = s.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=0) / D + eps)
    y = (xv * r).to(x.dtype.element_ty).to(tl.float32)
    wv = tl.load(w + (row % W_ROWS) * D + cols, mask=m, other=0.0)
    if ZERO_CENTERED:
        wv = (1.0 + wv.to(tl.float32)).to(w.dtype.element_ty)
    y = y * wv.to(tl.float32)
    if HAS_GATE:
        y = y.to(o.dtype.element_ty).to(tl.float32)
        gv = tl.load(g + p, mask=m, other=0.0).to(tl.float32)
        act = (gv / (1.0 + tl.exp(-gv))).to(g.dtype.element_ty).to(tl.float32)
        y = y * act
    tl.store(o + p, y.to(o.dtype.element_ty), mask=m)


def _launch(x, weight, eps, zero_centered=False, delta=None, rgate=None, gate=None):
    d = x.shape[-1]
    if weight.shape[-1] != d or weight.numel() % d:
        raise ValueError(f"norm weight {tuple(weight.shape)} does not match rows of width {d}")
    x = x.contiguous()
    rows = x.numel() // d
    w = weight.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if gate is not None:
        out_dtype = torch.promote_types(out_dtype, gate.dtype)
        gate = gate.contiguous()
    o = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    s = torch.empty_like(x) if delta is not None else None
    if delta is not None:
        delta = delta.to(x.dtype).contiguous() if delta.dtype != x.dtype else delta.contiguous()
    rg_stride = 0
    if rgate is not None:
        if rgate.numel() not in (1, d):
            raise ValueError(f"residual gate of {rgate.numel()} values; expected 1 or {d}")
        rgate = rgate.contiguous()
        rg_stride = 0 if rgate.numel() == 1 else 1
    _norm_kernel[(rows,)](x, delta if delta is not None else x, rgate if rgate is not None else x,
                          s if s is not None else o, w, gate if gate is not None else x, o, d, w.numel() // d,
                          rg_stride, eps, HAS_DELTA=delta is not None, HAS_RGATE=rgate is not None,
                          ZERO_CENTERED=zero_centered, HAS_GATE=gate is not None, BD=triton.next_power_of_2(d))
    return s, o


def rms_norm(x, weight, eps, zero_centered=False):
    return _launch(x, weight, eps, zero_centered)[1]


def add_rms_norm(x, delta, weight, eps, zero_centered=False, gate=None):
    return _launch(x, weight, eps, zero_centered, delta=delta, rgate=gate)


def rms_norm_gated(x, weight, gate, eps):
    if gate.shape != x.shape:
        raise ValueError(f"gate {tuple(gate.shape)} must have the shape of x {tuple(x.shape)}")
    return _launch(x, weight, eps, gate=gate)[1]

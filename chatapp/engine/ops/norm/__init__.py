"""RMSNorm glue: the residual add fused with the next norm, and the gated output norm (dispatch).

Entry points (all rows are the last dim of x; `weight` [D], or [W, D] for per-head weights where row r of x
flattened over its leading dims takes weight row r % W):
  rms_norm(x, weight, eps, zero_centered=False)                      -> y
  add_rms_norm(x, delta, weight, eps, zero_centered=False, gate=None) -> (s, rms_norm(s)), s = x + gate * delta
      (the pre-norm block's residual add and the next sublayer's norm; gate: OdinNext's sigmoid residual gate,
      [1] or [D]; Huginn's sandwich blocks keep only the norm)
  rms_norm_gated(x, weight, gate, eps)                               -> rms_norm(x) * silu(gate)
      (the GLA/GDN and FoX output gate of Genesis)
`zero_centered` applies (1 + w) (layers.RMSNorm). CPU tensors take torch.py, which is the architectures'
previous code verbatim (same numerics); CUDA tensors the fused Triton kernel (triton.py); SMOLLCHAT_OPS
forces a path (naive = naive.py, the oracle).
"""
from __future__ import annotations

from .. import backend
from . import naive as _naive
from . import torch as _torch_impl
from ...layers import rms_norm as _rms_norm_torch

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_gated"]


def _impl(x):
    which = backend(x.device)
    if which == "triton":
        from . import triton as _triton_impl
        return _triton_impl
    return which


def rms_norm(x, weight, eps, zero_centered=False):
    impl = _impl(x)
    if impl == "naive":
        return _naive.rms_norm_naive(x, weight, eps, zero_centered)
    if impl == "torch":
        return _rms_norm_torch(x, weight, eps, zero_centered)
    return impl.rms_norm(x, weight, eps, zero_centered)


def add_rms_norm(x, delta, weight, eps, zero_centered=False, gate=None):
    impl = _impl(x)
    if impl == "naive":
        return _naive.add_rms_norm_naive(x, delta, weight, eps, zero_centered, gate)
    return (_torch_impl if impl == "torch" else impl).add_rms_norm(x, delta, weight, eps, zero_centered, gate)


def rms_norm_gated(x, weight, gate, eps):
    impl = _impl(x)
    if impl == "naive":
        return _naive.rms_norm_gated_naive(x, weight, gate, eps)
    return (_torch_impl if impl == "torch" else impl).rms_norm_gated(x, weight, gate, eps)

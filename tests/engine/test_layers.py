"""The pieces several architectures share (engine/layers.py), each against a naive formula."""
from __future__ import annotations

import math

import pytest
import torch

from chatapp.engine.layers import causal_attention

from .closeness import assert_close


def attention_oracle(q, k, v, scale=None, keep=None):
    """Softmax attention written out with an explicit mask: query i of T sits at position L - T + i and sees
    keys 0..L - T + i (those `keep` marks, when given); query head h reads kv head h // (H / H_kv)."""
    b, t, h, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        kh, vh = k[:, head // (h // hkv)].double(), v[:, head // (h // hkv)].double()  # [B, L, D]
        for i in range(t):
            visible = [j for j in range(length) if j <= length - t + i and (keep is None or keep[j])]
            s = torch.einsum("bd,bjd->bj", q[:, i, head].double(), kh[:, visible]) * scale
            out[:, i, head] = torch.einsum("bj,bjd->bd", s.softmax(-1), vh[:, visible])
    return out


@pytest.mark.parametrize("t, cached", [(1, 0), (1, 12), (7, 0), (5, 12), (3, 1)])
@pytest.mark.parametrize("h, hkv", [(4, 4), (6, 2), (5, 1)])
def test_causal_attention_equals_the_explicit_mask(t, cached, h, hkv):
    g = torch.Generator().manual_seed(t * 100 + cached * 10 + hkv)
    length = cached + t
    q = torch.randn(2, t, h, 8, generator=g)
    k, v = torch.randn(2, hkv, length, 8, generator=g), torch.randn(2, hkv, length, 6, generator=g)
    assert_close(causal_attention(q, k, v), attention_oracle(q, k, v).float())
    assert_close(causal_attention(q, k, v, scale=0.5), attention_oracle(q, k, v, scale=0.5).float())


@pytest.mark.parametrize("t, cached", [(1, 9), (4, 9), (6, 0)])
def test_causal_attention_leaves_out_the_keys_keep_drops(t, cached):
    g = torch.Generator().manual_seed(11)
    length = cached + t
    q = torch.randn(1, t, 6, 8, generator=g)
    k, v = torch.randn(1, 3, length, 8, generator=g), torch.randn(1, 3, length, 8, generator=g)
    keep = torch.ones(length, dtype=torch.bool)
    keep[[1, 4]] = False  # every query still sees key 0
    got = causal_attention(q, k, v, keep=keep)
    assert_close(got, attention_oracle(q, k, v, keep=keep).float())
    # A dropped key's value cannot reach the output: poisoning it changes nothing.
    v2 = v.clone()
    v2[:, :, 4] = 1e6
    assert_close(causal_attention(q, k, v2, keep=keep), got)

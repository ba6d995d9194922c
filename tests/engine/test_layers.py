"""The pieces several architectures share (engine/layers.py), each against a naive formula."""
from __future__ import annotations

import math

import pytest
import torch

from chatapp.engine.layers import (PartialRope, RMSNorm, RopeTable, apply_rope_half, apply_rope_interleaved, apply_rope_matrices,
                                   causal_attention, cpu_linear, fuse, init_demo_normal, rename)

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


def naive_angles(positions, dim, theta):
    """position * theta^(-2j/dim), j < dim/2, in fp64."""
    j = torch.arange(dim // 2, dtype=torch.float64)
    return positions.double()[:, None] * theta ** (-2 * j / dim)


def test_rope_table_is_the_fp64_formula_rounded_once():
    # Positions near 4,096 are where fp32 angles drift (2.4e-4 rad); the table may only round cos/sin to fp32.
    table = RopeTable(64, 50000.0, n_pos=1024)
    cos, sin = table(4090, 6, "cpu")  # past n_pos: the table grows
    ang = naive_angles(torch.arange(4090, 4096), 64, 50000.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (6, 32)
    assert (cos.double() - ang.cos()).abs().max() <= 2 ** -24 and (sin.double() - ang.sin()).abs().max() <= 2 ** -24
    # Slices of one table agree with each other wherever they are cut.
    assert torch.equal(table(4093, 1, "cpu")[0], cos[3:4]) and torch.equal(table(0, 1, "cpu")[0], torch.ones(1, 32))


def rotate_naive(x, ang, pairs):
    """Rotate each pair (i, j) of x's last dim by its angle, as complex numbers, in fp64."""
    out = x.double().clone()
    for n, (i, j) in enumerate(pairs):
        z = torch.complex(x[..., i].double(), x[..., j].double()) * torch.polar(torch.ones_like(ang[:, n]), ang[:, n])[:, None]
        out[..., i], out[..., j] = z.real, z.imag
    return out


@pytest.mark.parametrize("layout", ["interleaved", "half_split"])
def test_full_width_rope_rotates_the_layouts_pairs(layout):
    d, start, t = 8, 37, 5
    x = torch.randn(2, t, 3, d, generator=torch.Generator().manual_seed(1))
    cos, sin = RopeTable(d, 10000.0)(start, t, "cpu")
    ang = naive_angles(torch.arange(start, start + t), d, 10000.0)
    pairs = [(2 * j, 2 * j + 1) for j in range(d // 2)] if layout == "interleaved" else [(j, j + d // 2) for j in range(d // 2)]
    apply = apply_rope_interleaved if layout == "interleaved" else apply_rope_half
    assert_close(apply(x, cos, sin), rotate_naive(x, ang, pairs).float())
    assert apply(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["interleaved", "half_split"])
@pytest.mark.parametrize("offset, rotated", [(0, 4), (12, 4), (2, 6)])
def test_partial_rope_rotates_only_its_dims(layout, offset, rotated):
    d, start, t = 16, 30, 7
    x = torch.randn(1, t, 3, d, generator=torch.Generator().manual_seed(2))
    rope = PartialRope(d, rotated, 10000.0, n_pos=32, offset=offset, layout=layout)
    got = apply_rope_matrices(x, rope.matrices(start, t, "cpu"))  # 30 + 7 > 32: the table grows
    ang = naive_angles(torch.arange(start, start + t), rotated, 10000.0)
    half = rotated // 2
    pairs = ([(offset + 2 * j, offset + 2 * j + 1) for j in range(half)] if layout == "interleaved"
             else [(offset + j, offset + j + half) for j in range(half)])
    assert_close(got, rotate_naive(x, ang, pairs).float())
    passed = [i for i in range(d) if not offset <= i < offset + rotated]
    assert torch.equal(got[..., passed], x[..., passed])  # one term times 1, the rest exact zeros
    # One decode position cut from the same tables gives the same rotation.
    assert_close(apply_rope_matrices(x[:, 3:4], rope.matrices(start + 3, 1, "cpu")), got[:, 3:4])
    assert apply_rope_matrices(x.bfloat16(), rope.matrices(start, t, "cpu")).dtype == torch.bfloat16


def test_fuse_stacks_rows_in_order_and_is_idempotent():
    q, k, v = torch.randn(6, 4), torch.randn(2, 4), torch.randn(3, 4)
    w = {"a.q": q, "a.k": k, "a.v": v, "other": torch.ones(1)}
    fuse(w, "a.qkv", ["a.q", "a.k", "a.v"])
    assert set(w) == {"a.qkv", "other"} and torch.equal(w["a.qkv"], torch.cat([q, k, v]))
    again = dict(w)
    fuse(again, "a.qkv", ["a.q", "a.k", "a.v"])  # our own state_dict: nothing to fuse
    assert again.keys() == w.keys() and again["a.qkv"] is w["a.qkv"]
    # Depthwise conv weights [C, 1, W] fuse along channels into [C, W].
    convs = {"k": torch.randn(2, 1, 4), "v": torch.randn(3, 1, 4)}
    fuse(convs, "kv", ["k", "v"], squeeze=True)
    assert convs["kv"].shape == (5, 4)
    # A partial set is a missing tensor, named (the loader reports it), not a silent half-fusion.
    with pytest.raises(KeyError, match="a.v"):
        fuse({"a.q": q, "a.k": k}, "a.qkv", ["a.q", "a.k", "a.v"])


def test_rename_moves_a_present_tensor_only():
    t = torch.ones(2)
    w = {"old": t}
    rename(w, "old", "new")
    rename(w, "missing", "other")
    assert w == {"new": t}


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 200])
def test_cpu_linear_is_the_product_rounded_to_bf16(rows):
    # Three or more rows go through fp32 tiles (300 output rows: two full tiles and a partial one).
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 70, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(300, generator=g).to(torch.bfloat16)
    x = torch.randn(1, rows, 70, generator=g).to(torch.bfloat16)
    got = cpu_linear(x, w, b, tile=128)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert got.shape == (1, rows, 300) and got.dtype == torch.bfloat16
    # Tiles: the fp32 product rounded once to bf16 (half a bf16 ulp, 2^-9 relative); one or two rows run bf16's
    # own GEMM, whose bias addition rounds a second time.
    assert_close(got, want.float(), atol=0.0, rtol=2 ** -8 if rows > 2 else 2 ** -6)


def test_init_demo_normal_draws_small_matrices_and_leaves_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(500, 64), RMSNorm(64), torch.nn.Linear(64, 300))
    init_demo_normal(model)
    for w in (model[0].weight, model[2].weight):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model[1].weight, torch.ones(64))  # norms keep their identity init

"""Forgetting attention: every path against the naive oracle, and the decode cache against one full pass.

Shapes are deliberately odd (T in 1, 37, 63, 200, 300; D != Dv; grouped key and value heads with different
group sizes, Genesis's 9/3/9 included), chunks are appended to non-empty caches (bottom-right causal mask),
and the gates range from mild to far below zero. The Triton kernels run under TRITON_INTERPRET=1 when no
GPU is present; their outputs are NaN-filled first, so an element a kernel forgets to write fails.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatapp.engine.ops import forgetting_attn as fa
from chatapp.engine.ops.forgetting_attn import forgetting_attn_naive
from chatapp.engine.ops.forgetting_attn import torch as fa_torch
from chatapp.engine.ops.forgetting_attn.cache import ForgettingKVCache
from chatapp.engine.state import ContextFull

from ..closeness import assert_close_rms
from .conftest import triton_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (H, Hk, Hv): plain MHA, Genesis's FoX layout (k grouped, v not), and both grouped differently.
HEADS = {"mha": (4, 4, 4), "genesis": (9, 3, 9), "gqa": (6, 2, 3)}


def make_inputs(t, length, heads, dtype, b=2, d=24, dv=20, seed=7, gate_scale=2.0, gate_shift=2.0):
    h, hk, hv = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen)
    k = torch.randn(b, hk, length, d, generator=gen)
    v = torch.randn(b, hv, length, dv, generator=gen)
    log_f = F.logsigmoid(torch.randn(b, h, length, generator=gen) * gate_scale + gate_shift)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_f.cumsum(-1)


def assert_close(got, ref, dtype, what):
    # (relative RMS, max-abs scale) of this op per input dtype
    assert_close_rms(got, ref, *((1e-5, 5e-5) if dtype == torch.float32 else (1.5e-2, 6e-2)), what)


def oracle(q, k, v, c):
    # The oracle sees the same (rounded) inputs as the path under test.
    return forgetting_attn_naive(q.float(), k.float(), v.float(), c)


def test_naive_matches_the_spec_formula_written_out():
    # One query row by hand: bias c_i - c_j excludes key j's own gate, diagonal bias 0, future keys masked.
    q, k, v, c = make_inputs(5, 5, (1, 1, 1), torch.float32, b=1, d=4, dv=3)
    o = forgetting_attn_naive(q, k, v, c)
    i = 3
    log_f = torch.diff(c[0, 0], prepend=torch.zeros(1))
    bias = torch.tensor([log_f[j + 1:i + 1].sum() for j in range(i + 1)])
    p = ((q[0, i, 0] @ k[0, 0, :i + 1].T) / 2.0 + bias).softmax(-1)
    assert torch.allclose(o[0, i, 0], p @ v[0, 0, :i + 1], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("t,length", [(1, 1), (63, 63), (300, 300), (7, 50), (37, 200)])
def test_torch_chunk_matches_naive(t, length, heads, dtype):
    q, k, v, c = make_inputs(t, length, heads, dtype)
    o = fa_torch.forgetting_attn_chunk(q, k, v, c)
    assert o.dtype == dtype and o.shape == (2, t, heads[0], 20)
    assert_close(o, oracle(q, k, v, c), dtype, "output")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("length", [1, 33, 200])
def test_torch_step_matches_naive(length, heads, dtype):
    q, k, v, c = make_inputs(1, length, heads, dtype)
    assert_close(fa_torch.forgetting_attn_step(q, k, v, c), oracle(q, k, v, c), dtype, "output")


def test_gates_far_below_zero_stay_finite():
    # Cumulative sums near -1e4: only differences enter the softmax, the diagonal term is always 0.
    q, k, v, c = make_inputs(50, 120, HEADS["genesis"], torch.float32, gate_scale=5.0, gate_shift=-80.0)
    assert c.min() < -5000
    ref = oracle(q, k, v, c)
    assert_close(fa_torch.forgetting_attn_chunk(q, k, v, c), ref, torch.float32, "chunk")
    assert_close(fa_torch.forgetting_attn_step(q[:, -1:], k, v, c), ref[:, -1:], torch.float32, "step")


def test_cache_prefill_then_steps_equals_one_pass():
    # Two prefill chunks then single-token steps through the cache == one causal pass over everything.
    h, hk, hv = HEADS["genesis"]
    gen = torch.Generator().manual_seed(3)
    n, d = 45, 16
    q, k, v = (torch.randn(1, n, x, d, generator=gen) for x in (h, hk, hv))
    log_f = F.logsigmoid(torch.randn(1, n, h, generator=gen) + 1.5)
    ref = forgetting_attn_naive(q, k.transpose(1, 2), v.transpose(1, 2), log_f.cumsum(1).transpose(1, 2))
    cache = ForgettingKVCache(64, h, hk, d, hv, d, "cpu", torch.float32)
    outs = []
    for lo, hi in [(0, 20), (20, 37)] + [(i, i + 1) for i in range(37, n)]:
        kc, vc, cc = cache.update(k[:, lo:hi], v[:, lo:hi], log_f[:, lo:hi])
        cache.advance(hi - lo)
        fn = fa_torch.forgetting_attn_step if hi - lo == 1 else fa_torch.forgetting_attn_chunk
        outs.append(fn(q[:, lo:hi], kc, vc, cc))
    assert cache.length == n and cc.dtype == torch.float32
    assert torch.allclose(cc, log_f.cumsum(1).transpose(1, 2), atol=1e-5)
    assert_close(torch.cat(outs, 1), ref, torch.float32, "cached output")


def test_cache_bytes_snapshot_trim_and_overflow():
    cache = ForgettingKVCache(10, 9, 3, 64, 9, 64, "cpu", torch.bfloat16)
    # Compact bf16 k (3 heads) + v (9 heads) + fp32 sums for 9 heads: the spec's 1,572 B/token.
    assert cache.bytes_per_token() == (192 + 576) * 2 + 9 * 4 == 1572
    assert cache.nbytes() == 10 * 1572
    k, v, f = torch.randn(1, 4, 3, 64), torch.randn(1, 4, 9, 64), -torch.rand(1, 4, 9)
    cache.update(k, v, f)
    cache.advance(4)
    assert cache.used_nbytes() == 4 * 1572
    snap = cache.snapshot()
    cache.update(k[:, :2], v[:, :2], f[:, :2])
    cache.advance(2)
    cache.trim(5)
    assert cache.length == 5
    cache.restore(snap)
    assert cache.length == 4
    _, _, c = cache.update(k[:, :1], v[:, :1], f[:, :1])
    assert torch.allclose(c[0, :, 4], f[0].sum(0) + f[0, 0], atol=1e-6)
    cache.advance(1)
    with pytest.raises(ContextFull):
        cache.update(torch.randn(1, 6, 3, 64), torch.randn(1, 6, 9, 64), -torch.rand(1, 6, 9))


def test_dispatch_reaches_the_torch_and_naive_paths(monkeypatch):
    monkeypatch.delenv("SMOLLCHAT_OPS", raising=False)
    q, k, v, c = make_inputs(5, 9, HEADS["gqa"], torch.float32)
    ref = oracle(q, k, v, c)
    assert_close(fa.forgetting_attn_chunk(q, k, v, c), ref, torch.float32, "torch via dispatch")
    monkeypatch.setenv("SMOLLCHAT_OPS", "naive")
    assert torch.equal(fa.forgetting_attn_chunk(q, k, v, c), ref)


@pytest.fixture
def fa_triton(monkeypatch):
    return triton_impl(monkeypatch, "chatapp.engine.ops.forgetting_attn.triton", "_forgetting_attn_step_kernel")


def _nan_out(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("heads", [HEADS["genesis"], HEADS["gqa"]], ids=["genesis", "gqa"])
@pytest.mark.parametrize("t,length", [(1, 1), (37, 37), (7, 50), (70, 100)])
def test_triton_chunk_matches_naive(fa_triton, t, length, heads, dtype):
    mod, device = fa_triton
    q, k, v, c = make_inputs(t, length, heads, dtype, b=1)
    out = _nan_out((1, t, heads[0], 20), dtype, device)
    o = mod.forgetting_attn_chunk(q.to(device), k.to(device), v.to(device), c.to(device), out=out)
    assert o is out
    assert_close(o.cpu(), oracle(q, k, v, c), dtype, "output")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("length", [1, 33, 130])
def test_triton_step_matches_naive(fa_triton, length, dtype):
    mod, device = fa_triton
    q, k, v, c = make_inputs(1, length, HEADS["genesis"], dtype, b=2)
    out = _nan_out((2, 1, 9, 20), dtype, device)
    o = mod.forgetting_attn_step(q.to(device), k.to(device), v.to(device), c.to(device), out=out)
    assert_close(o.cpu(), oracle(q, k, v, c), dtype, "output")


def test_triton_reads_a_strided_cache_view(fa_triton):
    # The model passes views of the filled part of a preallocated cache, not contiguous tensors.
    mod, device = fa_triton
    q, k, v, c = make_inputs(1, 40, HEADS["genesis"], torch.float32, b=1)
    big_k, big_v, big_c = torch.zeros(1, 3, 64, 24), torch.zeros(1, 9, 64, 20), torch.zeros(1, 9, 64)
    big_k[:, :, :40], big_v[:, :, :40], big_c[:, :, :40] = k, v, c
    ref = oracle(q, k, v, c)
    views = [x.to(device)[:, :, :40] for x in (big_k, big_v, big_c)]
    assert_close(mod.forgetting_attn_step(q.to(device), *views).cpu(), ref, torch.float32, "step on views")
    assert_close(mod.forgetting_attn_chunk(q.to(device), *views).cpu(), ref, torch.float32, "chunk on views")


def test_triton_gates_far_below_zero(fa_triton):
    mod, device = fa_triton
    q, k, v, c = make_inputs(20, 40, HEADS["genesis"], torch.float32, b=1, gate_scale=5.0, gate_shift=-80.0)
    o = mod.forgetting_attn_chunk(q.to(device), k.to(device), v.to(device), c.to(device))
    assert_close(o.cpu(), oracle(q, k, v, c), torch.float32, "output")

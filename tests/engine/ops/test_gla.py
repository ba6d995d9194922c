"""Gated linear attention: every path against the naive oracle (outputs and final state).

Shapes are deliberately odd (T in 1, 63, 200; K != V; heads not a power of two), the initial state is
non-zero, and both gate shapes are covered: per key channel [B, T, H, K] (HGRN2) and per head [B, T, H]
(Genesis GDN). The Triton kernels run under TRITON_INTERPRET=1 when no GPU is present.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatapp.engine.ops import gla
from chatapp.engine.ops.gla import gla_naive
from chatapp.engine.ops.gla import torch as gla_torch

from ..closeness import assert_close_rms
from .conftest import triton_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(t, per_head, dtype, b=2, h=3, dk=32, dv=24, seed=42, gate_scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, dk, generator=gen)
    k = torch.randn(b, t, h, dk, generator=gen)
    v = torch.randn(b, t, h, dv, generator=gen)
    f = torch.randn(b, t, h, *(() if per_head else (dk,)), generator=gen) * gate_scale
    s0 = torch.randn(b, h, dk, dv, generator=gen)
    # Gates stay fp32 in the models (logsigmoid of an fp32 pre-activation); q, k, v take the compute dtype.
    return [x.to(device, dtype) for x in (q, k, v)] + [F.logsigmoid(f).to(device), s0.to(device)]


def assert_close(got, ref, dtype, what):
    # (relative RMS, max-abs scale) of this op per input dtype
    assert_close_rms(got, ref, *((1e-5, 3e-5) if dtype == torch.float32 else (1e-2, 4e-2)), what)


def oracle(q, k, v, g, s0):
    # The oracle always sees the same (rounded) inputs as the path under test.
    return gla_naive(q.float(), k.float(), v.float(), g, None, s0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("per_head", [False, True], ids=["gate-per-channel", "gate-per-head"])
@pytest.mark.parametrize("t", [1, 63, 200])
def test_torch_chunk_matches_naive(t, per_head, dtype):
    q, k, v, g, s0 = make_inputs(t, per_head, dtype)
    o, s = gla_torch.gla_chunk(q, k, v, g, None, s0)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert o.shape == v.shape and s.shape == s0.shape
    assert_close(o, o_ref, dtype, "output")
    assert_close(s, s_ref, dtype, "final state")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("per_head", [False, True], ids=["gate-per-channel", "gate-per-head"])
@pytest.mark.parametrize("t", [1, 63])
def test_torch_step_matches_naive(t, per_head, dtype):
    q, k, v, g, s0 = make_inputs(t, per_head, dtype)
    o, s = gla_torch.gla_step(q, k, v, g, None, s0)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    assert_close(o, o_ref, dtype, "output")
    assert_close(s, s_ref, dtype, "final state")


def test_torch_step_updates_a_preallocated_state_in_place():
    q, k, v, g, s0 = make_inputs(1, False, torch.float32)
    buf = s0.clone()
    ptr = buf.data_ptr()
    o, s = gla_torch.gla_step(q, k, v, g, None, buf, out_state=buf)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    assert s is buf and buf.data_ptr() == ptr
    assert_close(buf, s_ref, torch.float32, "state updated in place")
    assert_close(o, o_ref, torch.float32, "output")


def test_chunk_then_steps_continue_the_same_recurrence():
    # Prefill 63 tokens, then decode 5 one at a time: identical to one pass over all 68.
    q, k, v, g, s0 = make_inputs(68, False, torch.float32)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    o1, s = gla_torch.gla_chunk(q[:, :63], k[:, :63], v[:, :63], g[:, :63], None, s0)
    outs = [o1]
    for i in range(63, 68):
        o, s = gla_torch.gla_step(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], g[:, i:i + 1], None, s, out_state=s)
        outs.append(o)
    assert_close(torch.cat(outs, 1), o_ref, torch.float32, "output")
    assert_close(s, s_ref, torch.float32, "final state")


def test_chunk_stays_finite_with_gates_far_below_zero():
    # logsigmoid is unbounded below: cumulative log decays of -1000 must not overflow exp(-b).
    q, k, v, _, s0 = make_inputs(200, False, torch.float32, b=1)
    g = F.logsigmoid(torch.randn(q.shape[:-1] + (32,), generator=torch.Generator().manual_seed(1)) * 30 - 15)
    assert g.sum(1).min() < -1000
    o, s = gla_torch.gla_chunk(q, k, v, g, None, s0)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    assert_close(o, o_ref, torch.float32, "output")
    assert_close(s, s_ref, torch.float32, "final state")


def test_no_initial_state_means_zeros():
    q, k, v, g, s0 = make_inputs(20, False, torch.float32)
    o, s = gla_torch.gla_chunk(q, k, v, g)
    o_ref, s_ref = oracle(q, k, v, g, torch.zeros_like(s0))
    assert_close(o, o_ref, torch.float32, "output")
    assert_close(s, s_ref, torch.float32, "final state")


def test_forced_naive_path_writes_into_out_state(monkeypatch):
    monkeypatch.setenv("SMOLLCHAT_OPS", "naive")
    q, k, v, g, s0 = make_inputs(5, True, torch.float32)
    buf = torch.empty_like(s0)
    o, s = gla.gla_step(q, k, v, g, None, s0, out_state=buf)
    assert s is buf
    assert_close(s, oracle(q, k, v, g, s0)[1], torch.float32, "naive path into out_state")


@pytest.fixture
def gla_triton(monkeypatch):
    return triton_impl(monkeypatch, "chatapp.engine.ops.gla.triton", "_gla_step_kernel")


def _on(device, *xs):
    return [x.to(device) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("per_head", [False, True], ids=["gate-per-channel", "gate-per-head"])
@pytest.mark.parametrize("t", [1, 63, 200])
def test_triton_chunk_matches_naive(gla_triton, t, per_head, dtype):
    mod, device = gla_triton
    q, k, v, g, s0 = make_inputs(t, per_head, dtype, b=1, h=2)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    # NaN-filled outputs would show any element the kernel forgot to write.
    o, s = mod.gla_chunk(*_on(device, q, k, v, g), None, s0.to(device))
    assert o.dtype == dtype and s.dtype == torch.float32
    assert_close(o.cpu(), o_ref, dtype, "output")
    assert_close(s.cpu(), s_ref, dtype, "final state")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("per_head", [False, True], ids=["gate-per-channel", "gate-per-head"])
@pytest.mark.parametrize("t", [1, 63])
def test_triton_step_matches_naive(gla_triton, t, per_head, dtype):
    mod, device = gla_triton
    q, k, v, g, s0 = make_inputs(t, per_head, dtype, b=1, h=2)
    o_ref, s_ref = oracle(q, k, v, g, s0)
    buf = torch.full_like(s0, float("nan")).to(device)
    o, s = mod.gla_step(*_on(device, q, k, v, g), None, s0.to(device), out_state=buf)
    assert s is buf
    assert_close(o.cpu(), o_ref, dtype, "output")
    assert_close(s.cpu(), s_ref, dtype, "final state")


def test_triton_step_in_place_and_without_initial_state(gla_triton):
    mod, device = gla_triton
    q, k, v, g, s0 = make_inputs(1, False, torch.float32, b=1, h=2)
    state = s0.clone().to(device)
    ptr = state.data_ptr()
    o, s = mod.gla_step(*_on(device, q, k, v, g), None, state, out_state=state)
    assert s.data_ptr() == ptr
    assert_close(state.cpu(), oracle(q, k, v, g, s0)[1], torch.float32, "in-place state")
    o, s = mod.gla_chunk(*_on(device, q, k, v, g))
    assert_close(s.cpu(), oracle(q, k, v, g, torch.zeros_like(s0))[1], torch.float32, "zero initial state")


def test_triton_chunk_stays_finite_with_gates_far_below_zero(gla_triton):
    mod, device = gla_triton
    q, k, v, _, s0 = make_inputs(40, False, torch.float32, b=1, h=1)
    g = F.logsigmoid(torch.randn(q.shape[:-1] + (32,), generator=torch.Generator().manual_seed(1)) * 30 - 15)
    o, s = mod.gla_chunk(*_on(device, q, k, v, g), None, s0.to(device))
    o_ref, s_ref = oracle(q, k, v, g, s0)
    assert_close(o.cpu(), o_ref, torch.float32, "output")
    assert_close(s.cpu(), s_ref, torch.float32, "final state")

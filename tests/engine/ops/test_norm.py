"""RMSNorm glue (ops/norm): every path against the naive oracle, and a whole model on the Triton path.

Widths are odd (not powers of two), rows several, weights plain, zero-centred and per head, residual gates
scalar and per channel; fp32 and bf16. The torch path is the architectures' previous code, so it must equal
the oracle's rounding points within a few units in the last place; the Triton kernel likewise. The Triton
tests run under TRITON_INTERPRET=1 when no GPU is present (test_triton_interpreter.py runs them in a fresh
process when this one imported triton first).
"""
from __future__ import annotations

import pytest
import torch

from chatapp.engine.ops import norm
from chatapp.engine.ops.norm import naive
from chatapp.engine.ops.norm import torch as norm_torch

from ..closeness import assert_close, dtype_tolerance
from .conftest import triton_impl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (leading shape, width): several rows, widths that are not powers of two (one wider than a 256 block).
SHAPES = [((3, 5), 77), ((2, 1, 3), 48), ((1, 2), 300)]


def close(got, ref, dtype, what):
    # A different summation order moves the fp32 rsqrt by an ulp or so, which can flip a bf16 rounding: a few ulps.
    tol = dtype_tolerance(dtype, 8)
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    assert_close(got, ref, atol=tol, rtol=tol, what=what)


def inputs(lead, d, dtype, weight_rows=0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g) * 3
    delta = torch.randn(*lead, d, generator=g)
    w = torch.randn(*((weight_rows,) if weight_rows else ()), d, generator=g) * 0.5 + 1
    gate = torch.randn(*lead, d, generator=g) * 2
    return [t.to(device, dtype) for t in (x, delta, w, gate)]


def _cases():
    for lead, d in SHAPES:
        for zc in (False, True):
            yield lead, d, zc


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead,d,zc", list(_cases()))
def test_torch_add_rms_norm_matches_naive(lead, d, zc, dtype):
    x, delta, w, _ = inputs(lead, d, dtype)
    for rgate in (None, torch.sigmoid(torch.randn(1)).to(dtype), torch.sigmoid(torch.randn(d)).to(dtype)):
        s, y = norm_torch.add_rms_norm(x, delta, w, 1e-6, zc, rgate)
        s_ref, y_ref = naive.add_rms_norm_naive(x, delta, w, 1e-6, zc, rgate)
        close(s, s_ref, dtype, "sum")
        close(y, y_ref, dtype, "normed")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_torch_gated_and_per_head_norms_match_naive(dtype):
    x, _, w, gate = inputs((2, 3, 4), 40, dtype)
    close(norm_torch.rms_norm_gated(x, w, gate, 1e-5), naive.rms_norm_gated_naive(x, w, gate, 1e-5), dtype, "gated")
    _, _, wh, _ = inputs((2, 3, 4), 40, dtype, weight_rows=4)
    close(norm.rms_norm(x, wh, 1e-6), naive.rms_norm_naive(x, wh, 1e-6), dtype, "per-head weight")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead,d,zc", list(_cases()))
def test_triton_add_rms_norm_matches_naive(monkeypatch, lead, d, zc, dtype):
    tri, dev = triton_impl(monkeypatch, "chatapp.engine.ops.norm.triton", "_norm_kernel")
    x, delta, w, _ = inputs(lead, d, dtype, device=dev)
    gates = (None, torch.sigmoid(torch.randn(1)).to(dev, dtype), torch.sigmoid(torch.randn(d)).to(dev, dtype))
    for rgate in gates:
        s, y = tri.add_rms_norm(x, delta, w, 1e-6, zc, rgate)
        s_ref, y_ref = naive.add_rms_norm_naive(x, delta, w, 1e-6, zc, rgate)
        close(s, s_ref, dtype, "sum")
        close(y, y_ref, dtype, "normed")
    close(tri.rms_norm(x, w, 1e-6, zc), naive.rms_norm_naive(x, w, 1e-6, zc), dtype, "plain norm")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("lead,d", [((2, 3, 4), 40), ((5, 3), 96), ((1, 7, 2), 33)])
def test_triton_gated_and_per_head_norms_match_naive(monkeypatch, lead, d, dtype):
    tri, dev = triton_impl(monkeypatch, "chatapp.engine.ops.norm.triton", "_norm_kernel")
    x, _, w, gate = inputs(lead, d, dtype, device=dev)
    close(tri.rms_norm_gated(x, w, gate, 1e-5), naive.rms_norm_gated_naive(x, w, gate, 1e-5), dtype, "gated")
    _, _, wh, _ = inputs(lead, d, dtype, weight_rows=lead[-1], device=dev)
    close(tri.rms_norm(x, wh, 1e-6), naive.rms_norm_naive(x, wh, 1e-6), dtype, "per-head weight")
    # fp32 weights beside bf16 activations: the output takes the promoted dtype, as in PyTorch.
    close(tri.rms_norm(x, w.float(), 1e-6), naive.rms_norm_naive(x, w.float(), 1e-6), dtype, "fp32 weight")


def test_triton_refuses_shapes_it_cannot_fuse(monkeypatch):
    tri, dev = triton_impl(monkeypatch, "chatapp.engine.ops.norm.triton", "_norm_kernel")
    x = torch.randn(2, 10, device=dev)
    with pytest.raises(ValueError, match="weight"):
        tri.rms_norm(x, torch.ones(7, device=dev), 1e-6)
    with pytest.raises(ValueError, match="residual gate"):
        tri.add_rms_norm(x, x, torch.ones(10, device=dev), 1e-6, gate=torch.ones(3, device=dev))
    with pytest.raises(ValueError, match="gate"):
        tri.rms_norm_gated(x, torch.ones(10, device=dev), torch.ones(2, 5, device=dev), 1e-6)


_KERNELS = [("chatapp.engine.ops.norm.triton", "_norm_kernel"), ("chatapp.engine.ops.gla.triton", "_gla_step_kernel"),
            ("chatapp.engine.ops.forgetting_attn.triton", "_forgetting_attn_fwd_kernel")]


@pytest.mark.parametrize("name", ["axiom", pytest.param("odinnext", marks=pytest.mark.slow),
                                  pytest.param("genesis", marks=pytest.mark.slow)])
@torch.inference_mode()
def test_triton_whole_model_gives_the_torch_paths_logits(monkeypatch, fixtures_root, name):
    """Every op of the model on its Triton kernel (norm glue, and the recurrences where the model has them)
    against the CPU torch path: the full forward, and a cached prefill + one decode step."""
    from safetensors.torch import load_file

    from chatapp.engine.loader import load_model

    dev = "cpu"
    for module, kernel in _KERNELS:
        _, dev = triton_impl(monkeypatch, module, kernel)
    d = fixtures_root / name
    if not d.is_dir():
        pytest.skip(f"the {name} fixture is absent from {fixtures_root}")
    ids = load_file(str(d / "golden.safetensors"))["input_ids"]
    model = load_model(d)
    monkeypatch.setenv("SMOLLCHAT_OPS", "torch")
    ref = model(ids)
    model = model.to(dev)
    monkeypatch.setenv("SMOLLCHAT_OPS", "triton")
    full = model(ids.to(dev)).cpu()
    state = model.make_state(ids.shape[1] + 4, dev, torch.float32)
    model(ids[:, :-1].to(dev), state)
    step = model(ids[:, -1:].to(dev), state).cpu()
    assert_close(full, ref, what=f"{name} full forward")
    assert_close(step[:, -1], ref[:, -1], what=f"{name} cached step")
    assert torch.equal(full.argmax(-1), ref.argmax(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["axiom", "odinnext", "genesis", "huginn"])
@torch.inference_mode()
def test_bf16_on_cuda_the_fused_glue_gives_the_torch_paths_tokens(monkeypatch, fixtures_root, name):
    """On a real GPU in bf16: the default dispatch (Triton kernels) against the same model with every op on its
    PyTorch path, same device and dtype: logits within bf16 rounding, the same greedy tokens where the margin
    is clear of that rounding."""
    from safetensors.torch import load_file

    from chatapp.engine.loader import load_model

    d = fixtures_root / name
    ids = load_file(str(d / "golden.safetensors"))["input_ids"].cuda()
    model = load_model(d, device="cuda", dtype="bfloat16")

    def logits():
        out = model(ids)
        return (out.logits if hasattr(out, "logits") else out).float().cpu()

    monkeypatch.delenv("SMOLLCHAT_OPS", raising=False)
    fused = logits()
    monkeypatch.setenv("SMOLLCHAT_OPS", "torch")
    ref = logits()
    tol = dtype_tolerance(torch.bfloat16, 8)
    assert_close(fused, ref, atol=tol, rtol=tol, what=f"{name} bf16 logits")
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (fused - ref).abs().amax(-1)
    assert torch.equal(fused.argmax(-1)[clear], ref.argmax(-1)[clear])

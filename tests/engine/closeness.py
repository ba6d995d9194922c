"""The one closeness check of the engine tests.

Exact equality is asserted only where it holds by construction (same shapes, same inputs, same path).
Everywhere else results may come from different kernels (another matrix size, another CPU, the AVX2
family), so the bound is either the one the test states (a fixture's tolerance) or one derived from
the dtype: a few dozen units in the last place of the reference's scale.
"""
from __future__ import annotations

import torch

# Units in the last place allowed when a test states no tolerance: a reduction of a few hundred terms
# summed in another order (a different GEMM blocking) moves the result by this much at most in practice.
ULPS = 64


def dtype_tolerance(dtype: torch.dtype, ulps: int = ULPS) -> float:
    """The relative tolerance a result of `dtype` gets when summed in another order."""
    return ulps * torch.finfo(dtype).eps


def assert_close(got: torch.Tensor, ref: torch.Tensor, atol: float | None = None, rtol: float | None = None,
                 *, tol: dict | None = None, dtype: torch.dtype | None = None, what: str = "") -> None:
    """max |got - ref| <= atol + rtol * max |ref|, with the bound from `tol` (a fixture's
    {"atol", "rtol"}), from atol/rtol, or else from the dtype (`dtype`, default the reference's)."""
    if tol is not None:
        atol, rtol = tol["atol"], tol["rtol"]
    if atol is None and rtol is None:
        rel = dtype_tolerance(dtype or (ref.dtype if ref.is_floating_point() else torch.float32))
        atol, rtol = rel, rel
    atol, rtol = atol or 0.0, 1e-4 if rtol is None else rtol
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape, f"{what} shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err, bound = (got - ref).abs().max().item(), atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{what} max abs err {err:.3e} > {bound:.3e}"


def assert_close_rms(got: torch.Tensor, ref: torch.Tensor, rms_tol: float, max_tol: float, what: str) -> None:
    """Relative-RMS check (flash-linear-attention's style) plus a max-abs bound scaled to the reference:
    for kernels whose error grows with length, where a plain max bound would be loose everywhere else."""
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    rms = (got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)
    assert rms < rms_tol, f"{what}: relative RMS error {rms:.2e} >= {rms_tol:g}"
    bound = max_tol * ref.abs().max().clamp_min(1.0)
    assert (got - ref).abs().max() <= bound, f"{what}: max abs error {(got - ref).abs().max():.3e} > {bound:.3e}"

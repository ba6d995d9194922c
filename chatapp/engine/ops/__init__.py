"""Kernels with a naive oracle beside each fast path; each op package dispatches through `backend`."""
from __future__ import annotations

import os

BACKENDS = ("naive", "torch", "triton")


def backend(device) -> str:
    """The implementation a call on `device` uses: SMOLLCHAT_OPS if set, else torch on CPU, triton on CUDA."""
    forced = os.environ.get("SMOLLCHAT_OPS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SMOLLCHAT_OPS={forced!r}; expected one of {', '.join(BACKENDS)}")
        return forced
    return "triton" if device.type == "cuda" else "torch"

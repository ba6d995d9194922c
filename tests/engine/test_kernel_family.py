"""The README test command runs the engine tests twice: on the machine's default kernels and under the
AVX2 family (ATEN_CPU_CAPABILITY=avx2 ...), because exactness that holds on one family can fail on another.
This checks that the second run really is on the family it names, so that run cannot pass vacuously."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.mark.skipif(not os.environ.get("ATEN_CPU_CAPABILITY"), reason="ATEN_CPU_CAPABILITY is not set in this run")
def test_the_forced_kernel_family_is_in_force():
    want = os.environ["ATEN_CPU_CAPABILITY"].lower()
    assert torch.backends.cpu.get_cpu_capability().lower() == want

"""Kernel tests: the Triton kernels run on the CPU through the interpreter when no GPU is present."""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # Triton picks the interpreter when its own library functions are decorated, i.e. at first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted() -> bool:
    import triton.language.standard as std
    return type(std.cumsum).__name__ == "InterpretedFunction"


def triton_impl(monkeypatch, module: str, kernel: str):
    """The Triton module and the device its kernels run on (the CPU through the interpreter without CUDA).
    `kernel` names one of the module's jitted kernels, to tell whether it was built for the interpreter."""
    pytest.importorskip("triton")
    if CUDA:
        return importlib.import_module(module), "cuda"
    if not interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET was set; "
                    "test_triton_interpreter.py runs these tests in a fresh process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = importlib.import_module(module)
    if type(getattr(mod, kernel)).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod, "cpu"

"""Runs the Triton kernel tests in a fresh process when this one imported triton without the interpreter
(the kernel test modules then skip them), and the dispatch every op package shares."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatapp.engine.ops import backend

from .conftest import CUDA, interpreted


def test_triton_paths_in_a_fresh_interpreter():
    pytest.importorskip("triton")
    if CUDA or interpreted():
        pytest.skip("the Triton tests run in this process")
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # Slow tests (whole models under the interpreter) are deselected, not skipped, unless slow tests are asked for.
    marks = [] if os.environ.get("SMOLLCHAT_SLOW") == "1" else ["-m", "not slow"]
    files = [str(here / f) for f in ("test_gla.py", "test_forgetting_attn.py", "test_norm.py")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "triton_", *marks]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-1000:]


def test_dispatch_follows_the_device_and_the_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SMOLLCHAT_OPS", raising=False)
    assert backend(cpu) == "torch"
    assert backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("SMOLLCHAT_OPS", " Naive ")
    assert backend(cpu) == "naive"
    monkeypatch.setenv("SMOLLCHAT_OPS", "fast")
    with pytest.raises(ValueError, match="SMOLLCHAT_OPS"):
        backend(cpu)

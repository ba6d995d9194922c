"""Engine test setup: one intra-op thread, and a module's golden fixture by name.

A test module that sets `FIXTURE = "genesis"` gets `fx` (that fixture directory, or a skip naming
it) and `golden` ((tensors of golden.safetensors, golden.json)) at module scope.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: a second OpenMP thread only spins (up to 100x slower when
    # the other core is busy). Benchmarks, not tests, measure threading.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def inductor_only(monkeypatch):
    """Decode steps compile with inductor even where the fused C++ step (engine/dense_step.py) would be taken:
    for the tests of the compiled path on Axiom's demo (the fused step has its own, test_dense_step.py)."""
    from chatapp.engine import dense_step, graphs

    monkeypatch.setattr(graphs.dense_step, "build", lambda *a, **k: (None, dense_step.NO_LAYOUT))


@pytest.fixture(scope="module")
def fx(request, fixtures_root):
    name = request.module.FIXTURE
    d = fixtures_root / name
    if not d.is_dir():
        pytest.skip(f"the {name} fixture is absent from {fixtures_root}")
    return d


@pytest.fixture(scope="module")
def golden(fx):
    return load_file(str(fx / "golden.safetensors")), json.loads((fx / "golden.json").read_text())


def demo_engine(entry_id: str, **kw):
    """The Engine the CLI opens on a demo entry: the demo checkpoint made on first use (under the test's
    own data dir), loaded with the catalog's settings; its parameter count is the catalog's."""
    from chatapp.catalog import get_entry
    from chatapp.engine.runtime import load_engine

    entry = get_entry(entry_id)
    engine = load_engine(entry, device="cpu", **kw)
    assert sum(p.numel() for p in engine.model.parameters()) == entry.params
    return engine

"""Demo checkpoints (chatapp.engine.demo): built deterministically with torch, found by the torch-free hub."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from chatapp import hub
from chatapp.catalog import load_catalog
from chatapp.engine.demo import ensure_demo
from chatapp.engine.loader import LoadError, load_model


def test_demo_is_deterministic_loadable_and_counts_as_downloaded(monkeypatch, tmp_path):
    demo = load_catalog()["axiom-tiny"]
    assert hub.local_dir(demo) is None and not hub.is_downloaded(demo)
    # The hub never builds one (that needs torch): before the engine made it, there is nothing to return.
    with pytest.raises(hub.HubError, match="demo"):
        hub.download(demo)
    rng = torch.get_rng_state()
    d = ensure_demo(demo)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's seed state is untouched
    assert hub.is_downloaded(demo) and hub.local_dir(demo) == d and hub.download(demo) == d
    first = (d / "model.safetensors").read_bytes()
    with safe_open(d / "model.safetensors", "pt") as f:
        assert f.metadata() == {"smollchat_demo": "random weights"}
    assert hub.file_path(demo, "config.json") == d / "config.json"
    assert hub.disk_usage(demo) >= len(first)
    model = load_model(d)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert ensure_demo(demo) == d and (d / "model.safetensors").read_bytes() == first  # made once

    monkeypatch.setenv("SMOLLCHAT_HOME", str(tmp_path / "second-home"))
    again = ensure_demo(demo)
    assert again != d and (again / "model.safetensors").read_bytes() == first
    assert not [p for p in again.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    reseeded = ensure_demo(replace(demo, demo_seed=demo.demo_seed + 1))
    assert reseeded == again and (again / "model.safetensors").read_bytes() != first
    hub.delete(demo)
    assert not hub.is_downloaded(demo)


def test_ensure_demo_refuses_a_real_entry():
    with pytest.raises(LoadError, match="smollchat download axiom"):
        ensure_demo(load_catalog()["axiom"])

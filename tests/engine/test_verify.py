"""`verify` on every shared fixture whose architecture exists; the same code `smollchat verify` runs."""
import pytest

from chatapp.engine.arch.base import ARCHITECTURES, UnknownArchitecture, arch_module
from chatapp.engine.loader import read_config
from chatapp.engine.verify import verify
from conftest import SHARED_FIXTURES

FIXTURES = sorted(p.name for p in SHARED_FIXTURES.glob("*") if (p / "golden.json").exists()) if SHARED_FIXTURES.is_dir() else []


@pytest.mark.parametrize("name", FIXTURES or ["(none)"])
def test_every_built_architecture_passes_its_fixture(fixture_dir, name):
    d = fixture_dir(name)
    try:
        arch_module(read_config(d)["model_type"])
    except UnknownArchitecture as e:
        pytest.skip(f"{name}: {e}")
    report = verify(d)
    assert report.ok, "\n".join(report.lines())
    assert report.comparisons and report.greedy_ids_match is not None


def test_unbuilt_architecture_raises_unknown(tmp_path, fixture_dir):
    import json
    import shutil

    src = fixture_dir("axiom")
    for f in ("model.safetensors", "golden.json", "golden.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba9"}))
    with pytest.raises(UnknownArchitecture):
        verify(tmp_path)
    assert "axiom" in ARCHITECTURES

"""Shared test setup. Torch-free on purpose: TUI tests must run without importing torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = Path(os.environ.get("SMOLLCHAT_FIXTURES", REPO.parent / "shared" / "fixtures"))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("SMOLLCHAT_SLOW") == "1" or "slow" in (config.getoption("-m") or "")
    cuda = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set SMOLLCHAT_SLOW=1 or pass -m slow"))
        if "gpu" in item.keywords:
            if cuda is None:
                try:
                    import torch
                    cuda = torch.cuda.is_available()
                except ImportError:
                    cuda = False
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"golden fixtures not found at {SHARED_FIXTURES} (they live in ../shared/fixtures of the repo)")
    return SHARED_FIXTURES


@pytest.fixture
def fixture_dir(fixtures_root):
    """fixture_dir('axiom') -> the golden fixture directory, or skip when it is absent."""
    def get(name: str) -> Path:
        d = fixtures_root / name
        if not d.is_dir():
            pytest.skip(f"fixture {name} not found in {fixtures_root}")
        return d
    return get


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own config/data/cache dirs, so nothing touches the user's files."""
    base = tmp_path_factory.mktemp("smollchat-home")
    monkeypatch.setenv("SMOLLCHAT_HOME", str(base))
    monkeypatch.setenv("HF_HOME", str(base / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # One intra-op thread for every engine a test loads (tiny models; a second thread only spins here).
    monkeypatch.setenv("SMOLLCHAT_THREADS", "1")

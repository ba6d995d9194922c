"""A bounded load on the loopback (bench/serve_load.py at a small scale): 8 concurrent streaming clients
x 5 requests, a quarter hanging up midway. Every request is answered or cleanly cancelled, and every
answer is its own prompt's (the greedy answer it gets alone), never mixed with another. Figures go to
bench/serve.md, not into assertions."""
from __future__ import annotations

import importlib.util
import sys
import time

from .conftest import REPO_BENCH


def _bench():
    spec = importlib.util.spec_from_file_location("serve_load", REPO_BENCH / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def test_concurrent_clients_with_disconnects(served):
    load = _bench()
    expected = load.expected_answers(served.url, "axiom-tiny", max_tokens=12)
    assert all(expected.values())
    before = served.pool.health()["axiom-tiny"]
    outcomes = load.run_load(served.url, "axiom-tiny", clients=8, requests=5, disconnect=0.25, max_tokens=12, seed=3)
    assert len(outcomes) == 40
    assert load.problems(outcomes, expected) == []
    hung = sum(o.hung_up for o in outcomes)
    assert 0 < hung < 40  # the seed gives both kinds
    deadline = time.monotonic() + 60
    while (h := served.pool.health()["axiom-tiny"])["running"] or h["queued"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    finished = (h["served"] - before["served"]) + (h["cancelled"] - before["cancelled"]) + (h["skipped"] - before["skipped"])
    assert finished == 40 and h["failed"] == before["failed"]  # each request ran to its end or was cancelled

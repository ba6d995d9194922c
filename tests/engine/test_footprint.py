"""The model pool's estimate of an engine before loading (runtime.footprint) against what the loaded engine
reports: weights and state exactly for the float forms, the quantized weights within the scales' rounding."""
from __future__ import annotations

import pytest

from chatapp.catalog import get_entry
from chatapp.engine.prompt_cache import DEFAULT_BUDGET
from chatapp.engine.runtime import footprint

from .conftest import demo_engine


@pytest.mark.parametrize("entry_id", ["axiom-tiny", "odinnext-tiny", "genesis-tiny", "byrne-tiny"])
def test_estimate_equals_the_loaded_engine(entry_id):
    engine = demo_engine(entry_id, compile="off")
    m = engine.memory()
    est = footprint(get_entry(entry_id), device="cpu")
    assert est.weights == m.weights
    assert est.state == m.state_total + DEFAULT_BUDGET


def test_int8_estimate_is_close_to_the_quantized_engine():
    from chatapp.engine.runtime import load_engine
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", compile="off", quantize="int8")
    est = footprint(get_entry("axiom-tiny"), device="cpu", quantize="int8")
    fp = footprint(get_entry("axiom-tiny"), device="cpu", dtype="float32")
    real = engine.memory().weights
    assert abs(est.weights - real) <= 0.02 * real, (est.weights, real)
    assert est.weights < fp.weights


def test_int4_estimate_is_close_to_the_quantized_engine():
    from chatapp.engine.runtime import load_engine
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", compile="off", quantize="int4")
    est = footprint(get_entry("axiom-tiny"), device="cpu", quantize="int4")
    real = engine.memory().weights
    assert abs(est.weights - real) <= 0.02 * real, (est.weights, real)

"""The model pool's memory budget: size parsing, the default, estimates and measured costs, least recently
used eviction within the budget, pins, the refusal of a model that cannot fit alone, and variants."""
from __future__ import annotations

import threading

import pytest

from chatapp.catalog import load_catalog
from chatapp.chat.fake import FakeEngine, fake_entry
from chatapp.chat.pool import (DEFAULT_SHARE, FALLBACK_BUDGET, Footprint, ModelPool, PoolError, default_budget,
                               measured_bytes, parse_bytes, rough_footprint, variant_key)

MiB = 2**20


def _pool(sizes: dict[str, int], budget: int, loads: list | None = None, **kw) -> ModelPool:
    """Fake models whose estimate is `sizes[id]` MiB (and which report less once loaded)."""
    def load(entry, progress):
        progress("loading weights")
        if loads is not None:
            loads.append(entry.id)
        return FakeEngine(entry=entry, weights_bytes=MiB, kv_bytes_per_token=0)

    return ModelPool({k: fake_entry(k) for k in sizes}, load, budget=budget * MiB,
                     estimate=lambda e: Footprint(sizes[e.id] * MiB - MiB, MiB), **kw)


@pytest.mark.parametrize("text,value", [("8GiB", 8 * 2**30), ("512 MiB", 512 * MiB), ("2.5G", 2_500_000_000),
                                        ("1024", 1024), ("6gb", 6 * 10**9), ("1.5gib", 3 * 2**29)])
def test_sizes_parse_in_binary_and_decimal_units(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "eight", "8 GiBs", "-1GiB", "0", "8 parsecs"])
def test_bad_sizes_say_what_to_write(text):
    with pytest.raises(ValueError, match="e.g. 8GiB|more than zero"):
        parse_bytes(text)


def test_default_budget_is_a_share_of_the_available_memory():
    assert default_budget(10 * 2**30) == int(10 * 2**30 * DEFAULT_SHARE)
    assert default_budget(0) == FALLBACK_BUDGET
    assert 0 < default_budget() < 2**50


def test_rough_estimate_is_parameters_times_bytes_of_the_load_form():
    axiom = load_catalog()["axiom"]
    assert rough_footprint(axiom).weights == axiom.params * 2  # bf16 on CPU
    import dataclasses
    assert rough_footprint(dataclasses.replace(axiom, quantize="int8")).weights == axiom.params


def test_lru_idle_engines_unload_until_the_new_one_fits():
    loads: list[str] = []
    pool = _pool({"a": 40, "b": 30, "c": 20, "d": 50}, budget=100, loads=loads)
    for k in ("a", "b", "c"):  # 90 of 100 MiB
        pool.acquire(k)
        pool.release(k)
    assert pool.usage().used == 90 * MiB and pool.fits_together(["a", "b", "c"])
    pool.acquire("a")  # a is now the most recently used, and pinned
    # d needs 50: b (30, least recently used) goes, then c (20); a stays (pinned, and most recent).
    pool.acquire("d")
    assert set(pool.slots) == {"a", "d"} and pool.usage().used == 90 * MiB
    assert not pool.fits_together(["a", "b", "d"]) and pool.fits_together(["a", "d"])
    assert loads == ["a", "b", "c", "d"]
    assert pool.acquire("a") is pool.slots["a"].engine and loads == ["a", "b", "c", "d"]  # already loaded: no load
    pool.close()


def test_pinned_engines_are_never_unloaded_and_the_error_names_them():
    pool = _pool({"a": 60, "b": 60}, budget=100)
    pool.acquire("a")  # in use
    with pytest.raises(PoolError) as e:
        pool.acquire("b")
    assert e.value.code == "pool_busy" and "a (60.0 MiB)" in str(e.value) and "--memory-budget" in str(e.value)
    pool.release("a")
    pool.acquire("b")  # now a is idle and unloads
    assert set(pool.slots) == {"b"}
    pool.close()


def test_a_model_that_cannot_fit_alone_is_refused_with_its_size_the_budget_and_what_to_do():
    axiom = load_catalog()["axiom"]
    pool = ModelPool({"axiom": axiom}, lambda e, p: pytest.fail("must not load"), budget=512 * MiB,
                     estimate=lambda e: Footprint(700 * MiB, 300 * MiB))
    with pytest.raises(PoolError) as e:
        pool.acquire("axiom")
    msg = str(e.value)
    assert e.value.code == "model_too_large"
    for part in ("Axiom", "1000.0 MiB", "700.0 MiB of weights", "300.0 MiB of state", "budget is 512.0 MiB",
                 "--memory-budget 1GiB", "int8 or int4", "smaller model"):
        assert part in msg, (part, msg)
    assert not pool.slots


def test_a_loaded_engine_is_charged_what_it_reports_when_that_is_more_than_the_estimate():
    pool = ModelPool({"a": fake_entry("a")}, lambda e, p: FakeEngine(entry=e, weights_bytes=30 * MiB,
                                                                       kv_bytes_per_token=1024, context_limit=1024),
                     budget=100 * MiB, estimate=lambda e: Footprint(MiB, 0))
    engine = pool.acquire("a")
    assert pool.cost("a") == measured_bytes(engine) == 30 * MiB + 1024 * 1024


def test_max_loaded_caps_the_count_besides_the_budget():
    pool = _pool({"a": 1, "b": 1, "c": 1}, budget=100, max_loaded=2)
    for k in "abc":
        pool.acquire(k)
        pool.release(k)
    assert set(pool.slots) == {"b", "c"} and not pool.fits_together(["a", "b", "c"])
    pool.close()


def test_two_threads_asking_for_one_model_share_one_load():
    gate, loads = threading.Event(), []

    def load(entry, progress):
        loads.append(entry.id)
        gate.wait(10)
        return FakeEngine(entry=entry)

    pool = ModelPool({"a": fake_entry("a")}, load, budget=2**30)
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(pool.acquire("a"))) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert loads == ["a"] and len(got) == 3 and all(g is got[0] for g in got) and pool.slots["a"].pins == 3


def test_a_failed_load_frees_its_room_and_raises_what_the_loader_raised():
    def load(entry, progress):
        raise OSError("disk on fire")

    pool = ModelPool({"a": fake_entry("a")}, load, budget=2**30)
    with pytest.raises(OSError, match="disk on fire"):
        pool.acquire("a")
    assert not pool.slots and pool.usage().used == 0


def test_variants_load_the_same_model_with_other_options_under_their_own_key():
    seen = []
    pool = ModelPool({"a": fake_entry("a")}, lambda e, p: seen.append((e.id, e.quantize, e.cpu_dtype))
                     or FakeEngine(entry=e), budget=2**30)
    key = pool.variant("a", quantize="int8")
    assert key == variant_key("a", "int8") == "a·int8" and pool.variant("a") == "a"
    pool.acquire(key)
    pool.acquire(pool.variant("a", dtype="bfloat16"))
    assert seen == [("a", "int8", "float32"), ("a", "none", "bfloat16")] and len(pool.slots) == 2
    with pytest.raises(PoolError):
        pool.variant("nope")


def test_the_pool_reserves_what_the_engine_prompt_cache_may_hold():
    from chatapp.chat.pool import PROMPT_CACHE_BYTES
    pytest.importorskip("torch")  # the engine constant lives beside torch code
    from chatapp.engine.prompt_cache import DEFAULT_BUDGET
    assert PROMPT_CACHE_BYTES == DEFAULT_BUDGET

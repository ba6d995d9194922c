"""Compare without the TUI: sides parsed from NAME=VALUE words, the plan (one engine or two that do not fit:
one after the other; two that fit: at once), each side run on a scratch copy, kept replies as siblings with
their run cards and token records, nothing of an unkept side left in the chat."""
from __future__ import annotations

import threading

import pytest

from chatapp.chat import compare
from chatapp.chat.compare import Result, Side, parse_side, plan, run_side
from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, fake_entry
from chatapp.chat.pool import Footprint, ModelPool
from chatapp.contract import Done

MiB = 2**20


def _pool(budget_mib: int = 100, size_mib: int = 30) -> ModelPool:
    entries = {k: fake_entry(k) for k in ("a", "b")}
    return ModelPool(entries, lambda e, p: FakeEngine([f"reply from {e.id}"], entry=e, controls=HUGINN_LIKE_CONTROLS,
                                                      weights_bytes=MiB, kv_bytes_per_token=8),
                     budget=budget_mib * MiB, estimate=lambda e: Footprint(size_mib * MiB, 0))


def _chat() -> tuple[Conversation, str]:
    conv = Conversation(settings={"temperature": 0.5})
    user = conv.add(None, "user", "hello there")
    conv.add(user.id, "assistant", "first answer")
    return conv, user.id


def test_words_become_settings_controls_and_load_options():
    side = parse_side("B", "huginn", "num_steps=4 temperature=0 max-tokens=9 quantize=int8 stop=x,y")
    assert side.settings == {"temperature": 0.0, "max_new_tokens": 9, "stop_strings": ["x", "y"]}
    assert side.controls == {"num_steps": "4"} and side.quantize == "int8" and side.dtype is None
    assert side.describe() == "huginn temperature=0.0 max_new_tokens=9 stop_strings=['x', 'y'] num_steps=4 quantize=int8"
    for bad, said in (("steps", "NAME=VALUE"), ("quantize=int3", "quantize must be one of"),
                      ("temperature=hot", "temperature expects a number"), ("top_p=2", "top_p must be in")):
        with pytest.raises(ValueError, match=said):
            parse_side("A", "m", bad)


def test_one_engine_runs_one_after_the_other_two_that_fit_at_once_two_that_do_not_in_turn():
    pool = _pool(budget_mib=100, size_mib=30)
    same = plan(pool, Side("A", "a", controls={"num_steps": 4}), Side("B", "a", controls={"num_steps": 32}))
    assert not same.parallel and same.keys == ("a", "a") and "one engine" in same.note
    two = plan(pool, Side("A", "a"), Side("B", "b"))
    assert two.parallel and "fit the 100.0 MiB memory budget together" in two.note
    int8 = plan(pool, Side("A", "a"), Side("B", "a", quantize="int8"))
    assert int8.parallel and int8.keys == ("a", "a·int8")
    tight = _pool(budget_mib=50, size_mib=30)
    apart = plan(tight, Side("A", "a"), Side("B", "b"))
    assert not apart.parallel and "do not fit the 50.0 MiB memory budget together" in apart.note
    # An engine in use (the chat's) cannot unload: it counts against the room the two would have; an idle one does not.
    pool.entries["c"] = fake_entry("c")
    pool.acquire("c")
    assert plan(pool, Side("A", "a"), Side("B", "b")).parallel  # 30 + 30 beside 30 in use: fits 100
    pool.slots["c"].cost = 60 * MiB
    assert not plan(pool, Side("A", "a"), Side("B", "b")).parallel
    pool.release("c")
    assert plan(pool, Side("A", "a"), Side("B", "b")).parallel


def _run(pool: ModelPool, conv: Conversation, parent: str, side: Side) -> Result:
    return _run_with(pool, conv, parent, side, None)


def _run_with(pool: ModelPool, conv: Conversation, parent: str, side: Side, presets) -> Result:
    result = Result(side, pool.variant(side.model_id, side.quantize, side.dtype))
    events = list(run_side(pool, result, conv, parent, cancel=threading.Event(), presets=presets))
    assert isinstance(events[-1], Done) and result.error is None, result.error
    return result


def test_two_settings_on_one_model_then_keep_one_keeps_one_sibling_with_its_run_card(store):
    pool = _pool()
    conv, user = _chat()
    a = _run(pool, conv, user, Side("A", "a", controls={"num_steps": 4}))
    b = _run(pool, conv, user, Side("B", "a", settings={"temperature": 0.0}, controls={"num_steps": 32}))
    assert len(conv.children(user)) == 1, "a run alone changes nothing in the chat"
    assert a.figures()["steps_per_token"] == 4 and b.figures()["steps_per_token"] == 32
    assert a.figures()["tokens"] == a.done.new_tokens and a.figures()["state_bytes"] > 0
    assert pool.slots["a"].pins == 0, "the engine is released after the run"
    [kept] = compare.keep([b], [a, b], conv, store)
    siblings = conv.children(user)
    assert len(siblings) == 2 and conv.current_leaf == kept.id and kept.content == "reply from a"
    assert kept.run["controls"]["num_steps"] == 32 and kept.run["settings"]["temperature"] == 0.0
    assert kept.run["compare"] == {"side": "B", "setup": "a temperature=0.0 num_steps=32", "with": "a num_steps=4"}
    saved = store.load(conv.id)
    assert saved.get(kept.id).run["compare"]["side"] == "B" and saved.get(kept.id).token_ids == kept.token_ids
    assert store.token_records([kept.id])[kept.id]["ids"] == kept.token_ids


def test_keep_both_adds_two_siblings_and_the_chat_settings_stay_as_they_were(store):
    pool = _pool()
    conv, user = _chat()
    a = _run(pool, conv, user, Side("A", "a"))
    b = _run(pool, conv, user, Side("B", "b", settings={"seed": 7}))
    kept = compare.keep([a, b], [a, b], conv, store)
    assert [m.run["model_id"] for m in kept] == ["a", "b"] and len(conv.children(user)) == 3
    assert kept[1].run["seed"] == 7 and conv.settings == {"temperature": 0.5} and conv.controls == {}


def test_a_side_that_fails_says_why_and_has_nothing_to_keep():
    pool = _pool()
    conv, user = _chat()
    result = Result(Side("A", "a", controls={"bogus": 1}), "a")
    assert list(run_side(pool, result, conv, user, cancel=threading.Event())) == []
    assert "unknown control 'bogus'" in result.error and pool.slots["a"].pins == 0
    with pytest.raises(ValueError, match="no finished reply"):
        compare.keep([result], [result], conv)


def test_compare_needs_a_user_turn():
    with pytest.raises(ValueError, match="send one first"):
        compare.last_user_turn(Conversation())


@pytest.fixture
def store(tmp_path):
    from chatapp.chat.store import Store
    s = Store(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def test_a_chat_preset_built_in_or_saved_lies_under_each_side(store):
    pool = _pool()
    conv, user = _chat()
    from chatapp.chat.presets import BUILTIN_PRESETS
    name = next(n for n, values in BUILTIN_PRESETS.items() if values)
    conv.settings = {"preset": name}
    a = _run(pool, conv, user, Side("A", "a", settings={"seed": 3}))
    for setting, value in BUILTIN_PRESETS[name].items():
        assert a.reply.run["settings"][setting] == value
    assert a.reply.run["seed"] == 3
    store.save_preset("mine", {"top_k": 5})
    conv.settings = {"preset": "mine", "temperature": 0.25}
    b = _run_with(pool, conv, user, Side("B", "a"), store.get_preset)
    assert b.reply.run["settings"]["top_k"] == 5 and b.reply.run["settings"]["temperature"] == 0.25
    conv.settings = {"preset": next(n for n, values in BUILTIN_PRESETS.items() if not values)}  # the card's own
    assert _run(pool, conv, user, Side("C", "a")).reply.run["settings"]["temperature"] == 0.7
    conv.settings = {"preset": "gone"}
    result = Result(Side("B", "a"), "a")
    list(run_side(pool, result, conv, user, cancel=threading.Event(), presets=lambda name: None))
    assert "preset 'gone'" in result.error

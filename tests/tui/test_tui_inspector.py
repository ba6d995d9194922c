"""The token inspector (issue 15): grouping and colour levels (tui/tokens.py) against hand-made records,
and the keys on the FakeEngine: toggle, cursor, next low-confidence token, colour measure, branch at a
token with an alternative, typed text or other compute, the distribution setting, a reply without a record."""
from __future__ import annotations

import math

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, FakeTokenizer
from chatapp.tui import tokens as tk
from chatapp.tui.widgets.inspector import InspectorPanel
from chatapp.tui.widgets.inspector_actions import NO_RECORD

from .conftest import SIZE, send, wait_until

#: Chosen-token probabilities 0.99, 0.82, 0.22, 0.95, 0.05: levels 0, 1, 3, 0, 4 (the fake cycles them).
LOGPROBS = [math.log(p) for p in (0.99, 0.82, 0.22, 0.95, 0.05)]


def _record(ids, texts, logprobs=None, steps=None):
    n = len(ids)
    return {"distribution": "raw", "ids": list(ids), "text": list(texts),
            "logprob": list(logprobs or [-0.1] * n), "entropy": [1.0] * n,
            "alternatives": [[[i, -0.1], [i + 1, -2.5]] for i in ids], "steps": list(steps or [None] * n)}


def test_a_character_split_over_byte_tokens_is_one_group_never_a_broken_glyph():
    tok = FakeTokenizer("bytes")
    text = "é✓a"
    ids = tok.encode(text) + [tok.stop_ids[0]]
    # What the stream recorded: "" for a byte that does not finish a character, then the character.
    texts = ["", "é", "", "", "✓", "a", ""]
    gs = tk.groups(_record(ids, texts), tok)
    assert [(g.start, g.end, g.text, g.kind) for g in gs] == [
        (0, 2, "é", "split"), (2, 5, "✓", "split"), (5, 6, "a", "text"), (6, 7, "⏎", "end")]
    # Without the tokenizer the recorded texts alone give the same cells.
    assert [(g.start, g.end) for g in tk.groups(_record(ids, texts))][:3] == [(0, 2), (2, 5), (5, 6)]
    # A reply cut inside a character shows the bytes it has, as hex.
    cut = tk.groups(_record(ids[:3], ["", "é", ""]), tok)
    assert cut[-1].kind == "split" and cut[-1].text == "⟨e2⟩"
    # Bytes that are no UTF-8 at all (random demo weights): hex too, grouped with the byte that ended them.
    bad = tk.groups(_record([0xE2, 0x41, 0x80], ["", "\ufffdA", "\ufffd"]), tok)
    assert [(g.start, g.end, g.text) for g in bad] == [(0, 2, "⟨e2⟩A"), (2, 3, "⟨80⟩")]
    # An alternative that is part of a character: hex, not a replacement sign.
    assert tk.piece(tok, 0xE2) == "⟨e2⟩" and tk.piece(tok, ord(" ")) == "␣" and "\ufffd" not in tk.piece(tok, 0x80)


def test_levels_legend_and_the_next_low_confidence_token():
    rec = _record(range(5), list("abcde"), LOGPROBS, steps=[4, 32, 8, 16, 31])
    gs = tk.groups(rec)
    assert [tk.group_level(rec, g, "prob", 32) for g in gs] == [0, 1, 3, 0, 4]
    assert tk.find_low(rec, gs, 0, "prob") == 2 and tk.find_low(rec, gs, 2, "prob") == 4
    assert tk.find_low(rec, gs, 4, "prob") is None and tk.find_low(rec, gs, 4, "prob", -1) == 2
    assert [tk.token_level(rec, i, "steps", 32) for i in range(5)] == [0, 4, 1, 2, 4]
    title, labels = tk.legend("prob", 32, "raw")
    assert title == "probability (raw)" and labels == ["≥90%", "≥60%", "≥30%", "≥10%", "<10%"]
    assert tk.legend("prob", 0, "final")[0] == "probability (after the sampling settings)"
    assert tk.legend("steps", 32, "raw")[1][0] == "0-6" and not tk.available(_record([1], ["x"]), "steps")


def inspector_engine(**kw):
    return FakeEngine(["alpha beta gamma delta epsilon zeta"], logprobs=LOGPROBS, **kw)


async def open_inspector(pilot):
    await send(pilot, "go")
    await pilot.press("alt+up")
    await pilot.press("t")
    screen = pilot.app.chat_screen
    await wait_until(pilot, lambda: screen.inspector.current is not None, what="the inspector")
    return screen.inspector.current


@pytest.mark.asyncio
async def test_keys_toggle_move_jump_and_change_the_measure(build):
    app = build(inspector_engine(controls=HUGINN_LIKE_CONTROLS, steps=[4, 32, 8, 16, 31]))
    async with app.run_test(size=SIZE) as pilot:
        ins = await open_inspector(pilot)
        panel = app.chat_screen.query_one(InspectorPanel)
        assert app.focused is ins and panel.display and ins.cursor == 0
        assert "probability (raw)" in str(panel.render()) and "token 1/7" in str(panel.render())
        await pilot.press("right")
        assert ins.cursor == 1 and "token 2/7" in str(panel.render())
        await pilot.press("n")  # next token under 0.3: " gamma" (0.22)
        assert ins.cursor == 2 and "22.0%" in str(panel.render())
        await pilot.press("n")
        assert ins.cursor == 4
        await pilot.press("p")
        assert ins.cursor == 2
        await pilot.press("c")
        assert ins.mode == "entropy" and "entropy (nats)" in str(panel.render())
        await pilot.press("c")
        assert ins.mode == "steps" and "steps (of 32)" in str(panel.render()) and "8 steps" in str(panel.render())
        await pilot.press("c")
        assert ins.mode == "prob"
        # The message's Markdown body is hidden while the tokens show; t closes, and Esc too.
        view = app.chat_screen.view.view_for(ins.message_id)
        assert not view.body.display
        await pilot.press("t")
        await wait_until(pilot, lambda: app.chat_screen.inspector.current is None)
        assert view.body.display and not panel.display and app.focused is app.chat_screen.view
        await pilot.press("t")
        await wait_until(pilot, lambda: app.chat_screen.inspector.current is not None)
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat_screen.inspector.current is None)


@pytest.mark.asyncio
async def test_branch_at_a_token_with_an_alternative(build):
    engine = inspector_engine()
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        ins = await open_inspector(pilot)
        screen = app.chat_screen
        conv = screen.conv
        src = conv.get(ins.message_id)
        await pilot.press("right", "right")
        assert ins.choice == 1  # the best alternative the model did not take
        await pilot.press("down")
        alt = ins.alternatives()[2][0]
        assert "▸" in str(screen.query_one(InspectorPanel).render())
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.streaming is None and conv.current_leaf != src.id
                         and conv.get(conv.current_leaf).status != "streaming", what="the branch")
        new = conv.get(conv.current_leaf)
        assert new.parent_id == src.parent_id and new.token_ids[:3] == [*src.token_ids[:2], alt]
        assert new.run["branched_from"] == {"message": src.id, "token": 2, "chosen": alt,
                                            "replaced": src.token_ids[2], "prefix_tokens": 3}
        assert engine.calls[-1].ids[-3:] == [*src.token_ids[:2], alt]  # the model continues from the choice
        assert screen.inspector.current is None and screen.view.selected == new.id
        stats = str(screen.view.view_for(new.id).query_one(".stats").render())
        assert f"prefill skipped {new.run['reused_tokens']} tok" in stats and new.run["reused_tokens"] > 0


@pytest.mark.asyncio
async def test_branch_with_typed_text_and_with_other_compute(build):
    engine = inspector_engine(controls=HUGINN_LIKE_CONTROLS)
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        ins = await open_inspector(pilot)
        screen = app.chat_screen
        conv = screen.conv
        src = conv.get(ins.message_id)
        await pilot.press("right", "e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "Replacement")
        await pilot.press(*" omega")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.streaming is None and len(conv.children(src.parent_id)) == 2
                         and conv.get(conv.current_leaf).status != "streaming", what="the typed branch")
        typed = conv.get(conv.current_leaf)
        assert typed.content.startswith("alpha omega") and typed.run["branched_from"]["token"] == 1

        # Other compute: fewer recurrence steps from token 2 of the first reply on.
        conv.controls["num_steps"] = 4
        await app.chat_screen.actions.branch_switched(src.id)
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: screen.inspector.current is not None)
        await pilot.press("right", "g")
        await wait_until(pilot, lambda: screen.streaming is None and len(conv.children(src.parent_id)) == 3
                         and conv.get(conv.current_leaf).status != "streaming", what="the redraw")
        redrawn = conv.get(conv.current_leaf)
        assert redrawn.run["controls"]["num_steps"] == 4 and redrawn.run["branched_from"]["chosen"] is None
        assert redrawn.token_ids[:1] == src.token_ids[:1] and set(redrawn.run["steps"][1:]) == {4}
        assert any("num_steps 4 (was 32)" in n.message for n in app._notifications)


@pytest.mark.asyncio
async def test_a_reply_without_a_record_says_so_and_the_distribution_setting(build, store):
    conv = Conversation(id="old", title="old chat", model_id="fake")
    q = conv.add(None, "user", "hi")
    conv.add(q.id, "assistant", "made before the inspector", run={"model_id": "fake"})
    store.save(conv)
    app = build(FakeEngine())
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("old")
        await pilot.press("alt+up", "t")
        await pilot.pause()
        assert app.chat_screen.inspector.current is None
        assert any(n.message == NO_RECORD for n in app._notifications)
        assert not app.session.inspect.final
        await send(pilot, "go")
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: app.chat_screen.inspector.current is not None)
        await pilot.press("d")
        await wait_until(pilot, lambda: app.session.inspect.final)
        assert store.get_setting("inspect_final") is True


@pytest.mark.asyncio
async def test_the_palette_lists_the_inspector_keys_while_it_is_open(build):
    app = build(inspector_engine())
    async with app.run_test(size=SIZE) as pilot:
        await open_inspector(pilot)
        helps = [c.help for c in app.get_system_commands(app.chat_screen)]
        for binding in ("inspector.next_low", "inspector.branch", "inspector.type", "inspector.rerun"):
            assert any(h.endswith(binding) for h in helps), binding


@pytest.mark.asyncio
async def test_a_byte_level_reply_steps_over_whole_characters(build):
    """On a byte tokenizer the cursor steps over characters: ✓ is one cell of three tokens, and the panel
    names them as bytes (never a replacement sign)."""
    app = build(FakeEngine(["ok ✓"], tokenizer=FakeTokenizer("bytes")))
    async with app.run_test(size=SIZE) as pilot:
        ins = await open_inspector(pilot)
        assert [g.text for g in ins.groups] == ["o", "k", " ", "✓", "⏎"]
        await pilot.press("right", "right", "right")
        panel = str(app.chat_screen.query_one(InspectorPanel).render())
        assert "token 4/7" in panel and "3 tokens make this character: ⟨e2⟩" in panel and "\ufffd" not in panel


@pytest.mark.asyncio
async def test_steps_colouring_marks_where_the_depth_changed_mid_reply(build, store):
    """A reply whose depth changed while it streamed (ControlChannel, recorded in the run card): coloured by
    steps, a bar marks the token where the change began and the panel names it there."""
    from chatapp.chat.session import Session
    from chatapp.contract import ControlChannel

    engine = FakeEngine(["one two three four five six"], controls=HUGINN_LIKE_CONTROLS)
    conv = Conversation(id="deep", title="depth", model_id="fake")
    user = conv.add(None, "user", "count")
    list(Session(engine, store=store).stream(conv, user.id, channel=ControlChannel(schedule={3: {"num_steps": 8}})))
    reply = conv.get(conv.current_leaf)
    assert reply.run["control_changes"] == [{"token": 3, "controls": {"num_steps": 8}}]
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("deep")
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: app.chat_screen.inspector.current is not None)
        ins = app.chat_screen.inspector.current
        await pilot.press("c", "c")
        assert ins.mode == "steps" and str(ins.render()).startswith("one two three│ four")
        await pilot.press("right", "right", "right")
        panel = str(app.chat_screen.query_one(InspectorPanel).render())
        assert "8 steps · from here num_steps 8" in panel and "steps (of 32)" in panel


@pytest.mark.slow
@pytest.mark.asyncio
async def test_branch_in_the_tui_on_a_recurrent_demo_model_resumes_from_a_snapshot_inside_the_reply(build):
    """OdinNext's recurrent state cannot be trimmed: a branch at token 37 resumes from the snapshot the
    prompt cache took 32 tokens into the reply, and the figures line says so; non-UTF-8 bytes of the
    random weights show as hex cells."""
    from chatapp.catalog import get_entry
    from chatapp.engine.runtime import load_engine

    engine = load_engine(get_entry("odinnext-tiny"), device="cpu", dtype="float32", compile="off")
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        screen.conv.settings.update({"temperature": 0.0, "max_new_tokens": 40, "seed": 1})
        screen.composer.insert("hello")
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.streaming is None and screen.conv.messages
                         and screen.conv.get(screen.conv.current_leaf).role == "assistant", timeout=120, what="the reply")
        src = screen.conv.get(screen.conv.current_leaf)
        assert src.run["stop_reason"] == "max_tokens"
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: screen.inspector.current is not None)
        ins = screen.inspector.current
        assert "\ufffd" not in str(ins.render())
        ins.cursor = next(i for i, g in enumerate(ins.groups) if g.start <= 36 < g.end)
        ins.action_move(0)
        index = ins.group.start
        await pilot.press("enter")
        conv = screen.conv
        await wait_until(pilot, lambda: screen.streaming is None and conv.current_leaf != src.id
                         and conv.get(conv.current_leaf).status != "streaming", timeout=120, what="the branch")
        new = conv.get(conv.current_leaf)
        assert new.run["branched_from"]["token"] == index >= 32
        assert new.run["reused_tokens"] == src.run["prompt_tokens"] + 32
        assert f"prefill skipped {new.run['reused_tokens']} tok" in str(screen.view.view_for(new.id).query_one(".stats").render())


@pytest.mark.asyncio
async def test_a_compute_change_while_a_reply_streams_takes_effect_at_the_next_token(build):
    """The compute panel's num_steps changed mid-reply: the tokens after it run at the new depth, the run
    card records where it began, and the inspector by steps marks that token."""
    words = " ".join(f"w{i}" for i in range(20))
    app = build(FakeEngine([words], controls=HUGINN_LIKE_CONTROLS, instant=False, tokens_per_s=10.0, ttft_s=0.0))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        screen.composer.insert("count")
        await pilot.press("enter")
        conv = screen.conv
        await wait_until(pilot, lambda: screen.live.busy and conv.get(conv.current_leaf).role == "assistant"
                         and len(conv.get(conv.current_leaf).token_ids or ()) >= 3, what="a few tokens")
        field = screen.query_one("#control-num_steps")
        field.value = "8"
        await field.action_submit()
        await wait_until(pilot, lambda: screen.streaming is None, timeout=30, what="the end of the reply")
        reply = conv.get(conv.current_leaf)
        (change,) = reply.run["control_changes"]
        at = change["token"]
        assert change["controls"] == {"num_steps": 8} and 3 <= at < 20
        assert set(reply.run["steps"][:at]) == {32} and set(reply.run["steps"][at:]) == {8}
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: screen.inspector.current is not None)
        await pilot.press("c", "c")
        assert "│" in str(screen.inspector.current.render())

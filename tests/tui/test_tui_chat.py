"""Pilot tests of the chat flows on the FakeEngine: send/stream, stop keeps the partial reply, edit
makes a branch, regenerate makes a sibling, sibling navigation, continue, delete, fork, the composer."""
from __future__ import annotations

import pytest

from chatapp.chat.fake import FakeEngine
from chatapp.tui.widgets.conversation import ConversationView
from chatapp.tui.widgets.message import MessageView

from .conftest import SIZE, send, wait_until

pytestmark = pytest.mark.asyncio

LONG = " ".join(f"word{i}" for i in range(400))


async def test_send_streams_a_reply_and_saves_it(build, store):
    app = build(FakeEngine(["Hello **there**, friend."]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi model")
        conv = app.chat_screen.conv
        user, reply = conv.path()
        assert (user.role, user.content) == ("user", "hi model")
        assert reply.content == "Hello **there**, friend." and reply.status == "ok"
        assert app.chat_screen.view.view_for(reply.id).body.source == reply.content
        assert reply.run["stop_reason"] == "eos"
        view = app.chat_screen.view.view_for(reply.id)
        assert "TTFT 50 ms" in str(view.query_one(".stats").render())
        saved = store.load(conv.id)
        assert [m.content for m in saved.path()] == ["hi model", "Hello **there**, friend."]
        assert [c.id for c in store.list_chats()] == [conv.id]


async def test_escape_stops_at_once_and_keeps_the_partial_reply(build, store):
    engine = FakeEngine([LONG], instant=False, tokens_per_s=100, ttft_s=0.0)
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 1000  # 4 s of reply: ample time to stop it
        app.chat_screen.composer.insert("go")
        # Not pilot.press: it waits for the process to go idle, which a streaming worker never is.
        app.chat_screen.composer.action_send()
        await wait_until(pilot, lambda: len(app.chat_screen.conv.messages) == 2
                         and len(app.chat_screen.conv.path()[-1].content) > 20, what="some streamed text")
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None, what="the stop")
        reply = app.chat_screen.conv.path()[-1]
        assert reply.status == "stopped" and reply.run["stop_reason"] == "cancelled"
        assert 20 < len(reply.content) < len(LONG)
        assert LONG.startswith(reply.content)
        view = app.chat_screen.view.view_for(reply.id)
        assert "stopped" in str(view.query_one(".header").render())
        assert store.load(app.chat_screen.conv.id).get(reply.id).status == "stopped"


async def test_edit_user_message_adds_a_branch_and_answers_it(build):
    app = build(FakeEngine(["first answer", "second answer"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "question one")
        conv = app.chat_screen.conv
        original = conv.path()[0]
        await pilot.press("alt+up")
        await pilot.press("up")  # select the user message
        await pilot.press("e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditMessage")
        app.screen.query_one("TextArea").load_text("question two")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and len(conv.messages) == 4)
        new_user, new_reply = conv.path()
        assert new_user.content == "question two" and new_user.id != original.id
        assert conv.get(original.id).content == "question one"  # never overwritten
        assert conv.sibling_index(new_user.id) == (1, 2)
        assert new_reply.content == "second answer"
        header = app.chat_screen.view.view_for(new_user.id).query_one(".header").render()
        assert "2/2" in str(header)


async def test_regenerate_adds_a_sibling_reply_and_arrows_switch_between_them(build, store):
    app = build(FakeEngine(["answer A", "answer B"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "q")
        conv = app.chat_screen.conv
        first = conv.path()[-1]
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and len(conv.messages) == 3)
        second = conv.path()[-1]
        assert second.id != first.id and second.parent_id == first.parent_id
        assert (first.content, second.content) == ("answer A", "answer B")
        assert conv.sibling_index(second.id) == (1, 2)
        await pilot.press("alt+up")
        await pilot.press("left")
        await wait_until(pilot, lambda: conv.current_leaf == first.id)
        assert app.chat_screen.view.view_for(first.id) is not None
        assert app.chat_screen.view.view_for(second.id) is None
        assert store.load(conv.id).current_leaf == first.id
        await pilot.press("right")
        await wait_until(pilot, lambda: conv.current_leaf == second.id)


async def test_continue_extends_a_cut_off_reply(build):
    app = build(FakeEngine(["one two three four five six", " seven eight"]))
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 3
        await send(pilot, "count")
        conv = app.chat_screen.conv
        reply = conv.path()[-1]
        assert reply.run["stop_reason"] == "max_tokens" and reply.content == "one two three"
        await pilot.press("alt+up", "c")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and reply.content != "one two three")
        assert reply.content == "one two three seven eight"
        assert app.chat_screen.view.view_for(reply.id).body.source == reply.content
        assert len(conv.messages) == 2  # extended in place, no new message
        assert reply.run["continued"]


async def test_delete_message_removes_its_subtree_after_confirming(build, store):
    app = build(FakeEngine(["a1", "a2"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        conv = app.chat_screen.conv
        second_prompt = conv.path()[2]
        await pilot.press("alt+up", "up", "d")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "Confirm")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: len(conv.messages) == 2)
        assert second_prompt.id not in conv.messages
        assert [m.content for m in store.load(conv.id).path()] == ["one", "a1"]
        assert len(app.chat_screen.view.query(MessageView)) == 2


async def test_fork_makes_a_new_chat_with_the_branch(build, store):
    app = build(FakeEngine(["a1", "a2"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        original = app.chat_screen.conv
        await pilot.press("alt+up", "up", "up", "f")  # fork at the first reply
        await wait_until(pilot, lambda: app.chat_screen.conv.id != original.id)
        forked = app.chat_screen.conv
        assert [m.content for m in forked.path()] == ["one", "a1"]
        assert len(original.messages) == 4
        assert {c.id for c in store.list_chats()} == {original.id, forked.id}


async def test_composer_newline_history_and_empty_prompt(build):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        composer = app.chat_screen.composer
        await pilot.press("enter")  # empty: nothing is sent
        assert not app.chat_screen.conv.messages
        await pilot.press("a", "ctrl+j", "b")
        assert composer.text == "a\nb"
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and len(app.chat_screen.conv.messages) == 2)
        assert app.chat_screen.conv.path()[0].content == "a\nb"
        await pilot.press("x", "up")
        assert composer.text == "a\nb"  # recalled
        await pilot.press("down", "down")
        assert composer.text == "x"  # back to the draft


async def test_sending_without_a_model_keeps_the_text_and_says_what_to_do(build):
    app = build(engine=None)
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.composer.insert("hello")
        await pilot.press("enter")
        await pilot.pause()
        assert app.chat_screen.composer.text == "hello"
        assert not app.chat_screen.conv.messages
        assert any("Ctrl+O" in n.message for n in app._notifications)


async def test_engine_error_marks_the_reply_and_keeps_its_text(build):
    app = build(FakeEngine(["alpha beta gamma delta"], error_after=2))
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.composer.insert("x")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and len(app.chat_screen.conv.messages) == 2)
        reply = app.chat_screen.conv.path()[-1]
        assert reply.status == "error" and reply.content == "alpha beta"
        assert "scripted engine failure" in str(app.chat_screen.view.view_for(reply.id).query_one(".stats").render())


async def test_message_list_selection_moves_and_is_marked(build):
    app = build(FakeEngine(["r"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "p")
        view = app.chat_screen.query_one(ConversationView)
        await pilot.press("alt+up")
        assert view.has_focus and view.selected == app.chat_screen.conv.current_leaf
        await pilot.press("k")
        assert view.selected == app.chat_screen.conv.path()[0].id
        assert view.view_for(view.selected).has_class("-selected")
        await pilot.press("escape")
        assert app.chat_screen.composer.has_focus

"""Issue 13's rough edges, each with a test that failed before its fix: built-in sampling presets
that are real presets, a Tab order that does not change between chats and has no invisible stops,
the label of a reply cut off by a crash, and the notice for a chat whose stored rows were repaired."""
from __future__ import annotations

import json

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import FakeEngine
from chatapp.chat.presets import BUILTIN_PRESETS

from .conftest import SIZE, wait_until

pytestmark = pytest.mark.asyncio

PRECISE = "precise (built-in)"


async def open_settings(pilot):
    app = pilot.app
    app.chat_screen.composer.focus()
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChatSettings", what="the settings dialog")
    return app.screen


def option_values(select) -> list[str]:
    return [value for _, value in select._options]


async def test_builtin_presets_are_listed_chosen_kept_and_never_deleted(build, store):
    store.save_preset("precise", {"temperature": 0.7})  # a user's preset of the same word stays distinct
    engine = FakeEngine(["ok"])
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        dialog = await open_settings(pilot)
        select = dialog.query_one("#preset")
        values = option_values(select)
        assert values[1:4] == list(BUILTIN_PRESETS) and "precise" in values[4:]
        select.value = PRECISE
        await pilot.pause()
        # Placeholders show what applies under the preset; the fields stay the chat's own overrides.
        assert dialog.query_one("#f-temperature").placeholder == "0.2"
        assert dialog.query_one("#f-temperature").value == ""
        await pilot.click("#delete-preset")
        assert "built in" in str(dialog.query_one(".error").render()) and PRECISE in option_values(select)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is app.chat_screen)
        conv = app.chat_screen.conv
        assert conv.settings == {"preset": PRECISE}
        assert app.session.settings_for(conv).temperature == 0.2
        dialog = await open_settings(pilot)
        assert dialog.query_one("#preset").value == PRECISE  # chosen again when the dialog reopens
        await pilot.press("escape")
        with pytest.raises(ValueError, match="built-in"):
            store.save_preset(PRECISE, {"temperature": 0.5})


async def test_saving_a_preset_under_a_builtin_name_is_refused_in_the_dialog(build, store):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        dialog = await open_settings(pilot)
        dialog.query_one("#f-temperature").value = "0.3"
        await pilot.click("#save-preset")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextPrompt")
        app.screen.query_one("Input").value = PRECISE
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is dialog)
        assert "built-in" in str(dialog.query_one(".error").render())
        assert store.get_preset(PRECISE) is None


async def test_the_tab_order_is_the_same_in_every_chat_and_has_no_invisible_stops(build, store):
    own = Conversation(id="own", title="Own prompt", model_id="fake", system_prompt="Be terse.")
    own.add(None, "user", "hi")
    default = Conversation(id="default", title="Default prompt", model_id="fake", settings={"preset": PRECISE})
    default.add(None, "user", "yo")
    store.save(own)
    store.save(default)
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        chains = {}
        for chat_id in ("own", "default"):
            await app.chat_screen.open_chat(chat_id)
            await pilot.pause()
            screen_chain = [w.id for w in app.screen.focus_chain]
            dialog = await open_settings(pilot)
            chains[chat_id] = [w.id for w in dialog.focus_chain]
            # Every stop is a field or a button the user sees, never a scrolling container.
            assert all(w.id for w in dialog.focus_chain) and "side" not in screen_chain
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.screen is app.chat_screen)
        assert chains["own"] == chains["default"]
        assert chains["own"][:3] == ["use-default", "system", "preset"]


def reply_figures(app, message_id: str) -> str:
    return str(app.chat_screen.view.view_for(message_id).query_one(".stats").render())


async def test_a_reply_cut_off_by_a_crash_says_so_and_how_to_continue_it(build, tmp_path):
    from chatapp.chat.store import Store

    path = tmp_path / "crashed.sqlite3"
    conv = Conversation(id="cut", title="Cut off", model_id="fake")
    question = conv.add(None, "user", "tell me")
    reply = conv.add(question.id, "assistant", "the first half", status="streaming")
    with Store(path) as before:
        before.save(conv)  # the app was killed here, mid-reply
    store = Store(path)  # the next start
    engine = FakeEngine([" and the rest"])
    app = build(engine, store=store)
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("cut")
        await pilot.pause()
        figures = reply_figures(app, reply.id)
        assert "cut off: smollchat closed while it streamed · c continues it" in figures
        assert "0 tokens" not in figures  # nothing was counted for it, so no count is shown
        app.chat_screen.view.focus()
        app.chat_screen.view.select(reply.id)
        await pilot.press("c")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None
                         and app.chat_screen.conv.get(reply.id).content != "the first half", what="the continuation")
        assert app.chat_screen.conv.get(reply.id).content == "the first half and the rest"
    store.close()


async def test_opening_a_repaired_chat_says_what_was_repaired_once(build, store):
    import sqlite3

    conv = Conversation(id="hurt", title="Hand-edited", model_id="fake")
    conv.add(conv.add(None, "user", "q").id, "assistant", "a", id="reply")
    store.save(conv)
    raw = sqlite3.connect(store.path)
    with raw:
        raw.execute("UPDATE messages SET run = '[1, 2]' WHERE id = 'reply'")
    raw.close()
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        def told() -> list:
            return [n for n in app._notifications if "damaged" in n.title]

        await app.chat_screen.open_chat("hurt")
        await pilot.pause()
        assert len(told()) == 1 and "message reply: run must be an object" in told()[0].message
        await pilot.press("ctrl+n")
        await pilot.pause()
        await app.chat_screen.open_chat("hurt")
        await pilot.pause()
        assert len(told()) == 1  # once


async def test_export_to_a_mistyped_folder_fails_and_an_import_twice_gets_a_title_apart(build, store, tmp_path):
    from .conftest import send
    from .test_tui_app import answer_prompt

    app = build(FakeEngine(["answer"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await pilot.press("f4")
        await answer_prompt(pilot, str(tmp_path / "no-such-folder" / "chat.json"))
        assert not (tmp_path / "no-such-folder").exists()
        assert any("does not exist" in n.message for n in app._notifications)
        await pilot.press("f4")
        await answer_prompt(pilot, str(tmp_path / "chat.json"))
        for _ in range(2):
            await pilot.press("f5")
            await answer_prompt(pilot, str(tmp_path / "chat.json"))
            await pilot.pause()
        titles = [row.title for row in store.list_chats()]
        assert len(titles) == 3 and len(set(titles)) == 3


async def test_opening_a_chat_of_another_model_offers_that_model(build, store):
    conv = Conversation(id="old", title="From before", model_id="genesis-tiny")
    conv.add(None, "user", "hello")
    store.save(conv)
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("old")
        await pilot.pause()
        assert "this chat was with genesis-tiny (Ctrl+O)" in str(app.chat_screen.query_one("#chat-header").render())
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ModelsScreen")
        assert app.screen.entry.id == "genesis-tiny" and app.entry_id == "fake"  # offered, not loaded

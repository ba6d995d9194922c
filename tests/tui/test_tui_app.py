"""Pilot tests of the app around the conversation: the chat list (new, rename, delete, search),
export/import, per-chat settings and presets, compute and memory panels, keys.toml, themes, help,
the command palette, and opening an older or damaged database."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest

from chatapp import locations
from chatapp.chat import schema
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine
from chatapp.tui.app import make_app
from chatapp.tui.keys import KEYS, spec
from chatapp.tui.screens.help import HelpScreen
from chatapp.tui.widgets.chat_list import ChatList
from chatapp.tui.widgets.compute import ComputePanel
from chatapp.tui.widgets.memory import MemoryPanel

from .conftest import SIZE, ghost_fake, send, wait_until

pytestmark = pytest.mark.asyncio


def chat_titles(app) -> list[str]:
    options = app.chat_screen.query_one(ChatList).options
    return [str(options.get_option_at_index(i).prompt).split("\n")[0].removeprefix(ChatList.OPEN_MARK).strip()
            for i in range(options.option_count)]


async def answer_prompt(pilot, text: str) -> None:
    """Fill the TextPrompt dialog on top and press Enter."""
    await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "TextPrompt")
    pilot.app.screen.query_one("Input").value = text
    await pilot.press("enter")
    await pilot.pause()


async def test_chat_list_new_rename_search_delete(build, store):
    app = build(FakeEngine(["pong"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "ping about llamas")
        await pilot.press("ctrl+n")
        await send(pilot, "something else")
        assert chat_titles(app) == ["something else", "ping about llamas"]
        await pilot.press("f2")
        await answer_prompt(pilot, "Renamed chat")
        assert chat_titles(app)[0] == "Renamed chat" and app.chat_screen.conv.title == "Renamed chat"
        await pilot.press("ctrl+f")
        await pilot.press(*"llama")
        await wait_until(pilot, lambda: chat_titles(app) == ["ping about llamas"])  # found by content
        await pilot.press("enter", "enter")  # into the list, open the highlighted chat
        await wait_until(pilot, lambda: app.chat_screen.conv.title == "ping about llamas")
        await pilot.press("f8")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "Confirm")
        await pilot.click("#yes")
        await wait_until(pilot, lambda: len(store.list_chats()) == 1)
        assert store.list_chats()[0].title == "Renamed chat"
        assert not app.chat_screen.conv.messages  # a fresh chat replaced the deleted one


async def test_export_markdown_and_json_then_import_round_trip(build, store, tmp_path):
    app = build(FakeEngine(["first", "second"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: app.chat_screen.streaming is None and len(app.chat_screen.conv.messages) == 3)
        original = app.chat_screen.conv
        await pilot.press("f4")
        await answer_prompt(pilot, str(tmp_path / "chat.md"))
        markdown = (tmp_path / "chat.md").read_text()
        assert "hello" in markdown and "second" in markdown and "first" not in markdown  # the branch shown
        await pilot.press("f4")
        await answer_prompt(pilot, str(tmp_path / "chat.json"))
        tree = json.loads((tmp_path / "chat.json").read_text())
        assert tree["format"] == "smollchat.chat" and len(tree["conversation"]["messages"]) == 3
        await pilot.press("f5")
        await answer_prompt(pilot, str(tmp_path / "chat.json"))
        await wait_until(pilot, lambda: app.chat_screen.conv.id != original.id)
        imported = app.chat_screen.conv
        assert sorted(m.content for m in imported.messages.values()) == sorted(
            m.content for m in original.messages.values())
        assert [m.content for m in imported.path()] == [m.content for m in original.path()]
        assert len(store.list_chats()) == 2
        (tmp_path / "broken.json").write_text("{not json")
        await pilot.press("f5")
        await answer_prompt(pilot, str(tmp_path / "broken.json"))
        assert any("Could not import broken.json: not a smollchat chat export" in n.message for n in app._notifications)
        assert len(store.list_chats()) == 2


async def test_settings_dialog_sets_system_prompt_overrides_and_presets(build, store):
    engine = FakeEngine(["ok"])
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChatSettings")
        dialog = app.screen
        dialog.query_one("#use-default").value = False
        await pilot.pause()
        dialog.query_one("#system").load_text("You are a pirate.")
        dialog.query_one("#f-temperature").value = "0"
        dialog.query_one("#f-max_new_tokens").value = "5"
        dialog.query_one("#f-top_p").value = "7"
        await pilot.press("ctrl+s")
        assert "top_p must be in (0, 1]" in str(dialog.query_one(".error").render())
        dialog.query_one("#f-top_p").value = ""
        await pilot.click("#save-preset")
        await answer_prompt(pilot, "cold")
        assert store.get_preset("cold") == {"temperature": 0.0, "max_new_tokens": 5}
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is app.chat_screen)
        conv = app.chat_screen.conv
        assert conv.system_prompt == "You are a pirate."
        assert conv.settings == {"temperature": 0.0, "max_new_tokens": 5, "preset": "cold"}
        await send(pilot, "hi")
        call = engine.calls[-1]
        assert call.settings.temperature == 0.0 and call.settings.max_new_tokens == 5
        assert "You are a pirate." in engine.tokenizer.decode(call.ids)
        assert store.load(conv.id).system_prompt == "You are a pirate."
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ChatSettings")
        await pilot.click("#delete-preset")
        assert store.get_preset("cold") is None
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: app.screen is app.chat_screen)
        assert "preset" not in conv.settings and conv.settings["max_new_tokens"] == 5


async def test_compute_panel_is_built_from_controls_and_reaches_the_engine(build):
    engine = FakeEngine(["a b c d e f"], controls=HUGINN_LIKE_CONTROLS, steps=[32, 8, 4, 16])
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.chat_screen.query_one(ComputePanel)
        assert panel.display
        ids = {w.id for w in panel.query("Input, Select, Switch")}
        assert ids == {f"control-{c.name}" for c in HUGINN_LIKE_CONTROLS}
        steps_input = panel.query_one("#control-num_steps")
        steps_input.value = "500"
        await pilot.click("#control-num_steps")
        await pilot.press("enter")
        assert steps_input.has_class("-invalid") and "within [1, 128]" in str(panel.query_one(".help").render())
        steps_input.value = "32"
        await pilot.press("enter")
        panel.query_one("#control-exit_criterion").value = "kl"
        await pilot.pause()
        assert app.chat_screen.conv.controls == {"exit_criterion": "kl"}
        await send(pilot, "go")
        assert engine.calls[-1].controls["exit_criterion"] == "kl"
        readout = str(panel.query_one(".readout").render())
        used = [32, 8, 4, 16, 32, 8, 4]  # six words and the end-of-turn token
        assert f"mean {sum(used) / 7:.1f} · max 32 of 32" in readout
        assert f"early exit saved {(1 - sum(used) / (32 * 7)) * 100:.0f}% of 32 × 7 steps" in readout


async def test_compute_panel_is_hidden_without_controls(build):
    app = build(FakeEngine())
    async with app.run_test(size=SIZE):
        assert not app.chat_screen.query_one(ComputePanel).display


async def test_memory_panel_follows_the_stream_with_a_ghost_line(build):
    engine = ghost_fake(["x " * 40], kv_bytes_per_token=0, recurrent_bytes=65536, n_layers=12, hidden_size=768)
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        panel = app.chat_screen.query_one(MemoryPanel)
        text = str(panel.render())
        used = panel.report.context_used
        assert used > 40 and f"{used} / 2,048 tokens" in text
        assert "recurrent    64.0 KiB" in text
        ghost_mib = 2 * 12 * 768 * 2 * used / 2**20
        assert f"dense KV   {ghost_mib:.1f} MiB now" in text
        assert "dense KV: 12 layers × 768, bf16 K+V" in text
        assert "state      64.0 KiB now" in text


async def test_keys_toml_remaps_bindings_by_id(build, store):
    locations.keys_path().write_text('[keys]\n"chat.new" = "ctrl+g"\n')
    app = make_app(engine=FakeEngine(["r"]), store=store, clock=lambda: 0.0)
    assert app.keymap == {"chat.new": "ctrl+g"}
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        first = app.chat_screen.conv.id
        await pilot.press("ctrl+n")
        assert app.chat_screen.conv.id == first  # the old key is gone
        await pilot.press("ctrl+g")
        assert app.chat_screen.conv.id != first


async def test_broken_keys_toml_is_reported_and_defaults_apply(store):
    locations.keys_path().write_text('[keys]\n"chat.nope" = "ctrl+k"\n')
    app = make_app(engine=FakeEngine(), store=store)
    async with app.run_test(size=SIZE):
        assert app.keymap == {}
        assert any("unknown binding id 'chat.nope'" in n.message for n in app._notifications)


async def test_theme_choice_persists_and_user_themes_load(store):
    user = locations.user_themes_dir()
    user.mkdir(parents=True, exist_ok=True)
    (user / "mine.toml").write_text('name = "mine"\nprimary = "#ff00ff"\ndark = true\n')
    (user / "bad.toml").write_text('name = "bad"\nprimary = "not-a-colour"\n')
    app = make_app(engine=FakeEngine(), store=store)
    async with app.run_test(size=SIZE) as pilot:
        assert app.theme == "smoll-dark"
        assert {"smoll-dark", "smoll-light", "smoll-amber", "smoll-contrast", "mine"} <= set(app.available_themes)
        assert any("bad.toml" in n.message for n in app._notifications)
        app.theme = "mine"
        await pilot.pause()
    assert store.get_setting("theme") == "mine"
    again = make_app(engine=FakeEngine(), store=store)
    async with again.run_test(size=SIZE):
        assert again.theme == "mine"


async def test_help_lists_every_binding_and_the_palette_every_action(build):
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        text = str(app.screen.query_one("Static").render())
        for k in KEYS:
            assert k.id in text
        await pilot.press("escape")
        commands = list(app.get_system_commands(app.chat_screen))
        titles = [c.title for c in commands]
        assert len(titles) == len(set(titles)), "a command is listed twice (Theme, Delete chat were)"
        ids = {k.id for k in KEYS}
        listed = {c.help.rsplit(" · ", 1)[-1] for c in commands} & ids
        actions = {spec(i).action for i in listed} | {"command_palette", "quit", "change_theme"}
        for k in KEYS:
            if k.scope in ("chat", "composer", "messages", "chats") or k.id in ("app.help", "app.models"):
                assert k.action in actions, k.id


async def test_palette_runs_an_action(build):
    app = build(FakeEngine(["r"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        first = app.chat_screen.conv.id
        command = next(c for c in app.get_system_commands(app.chat_screen) if c.title == "New chat")
        app.call_later(command.callback)
        await wait_until(pilot, lambda: app.chat_screen.conv.id != first)


async def test_older_database_is_migrated_and_its_chats_listed():
    path = locations.database_path()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    schema._v1(conn)
    conn.execute("INSERT INTO schema_version VALUES (1, 'chats and message trees', ?)", (time.time(),))
    conn.execute("INSERT INTO chats VALUES ('c1', 'From version one', 'fake', NULL, '{}', '{}', 1.0, 2.0, 'm1')")
    conn.execute("INSERT INTO messages VALUES ('m1', 'c1', NULL, 'user', 'old words', 1.0, 'ok', '{}', NULL)")
    conn.commit()
    conn.close()
    app = make_app(engine=FakeEngine())
    async with app.run_test(size=SIZE) as pilot:
        assert app.store.schema_version == schema.SCHEMA_VERSION
        assert chat_titles(app) == ["From version one"]
        await pilot.pause()
        app.chat_screen.query_one(ChatList).options.focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.chat_screen.conv.id == "c1")
        assert [m.content for m in app.chat_screen.conv.path()] == ["old words"]
    assert list(path.parent.glob("chats.sqlite3.pre-v*.bak"))


async def test_damaged_database_is_backed_up_and_reported():
    locations.database_path().write_bytes(b"this is not sqlite" * 100)
    app = make_app(engine=FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        assert any("damaged" in n.message for n in app._notifications)
        await send(pilot, "still works")
    assert list(locations.data_dir().glob("chats.sqlite3.damaged-*.bak"))
    assert locations.database_path().read_bytes().startswith(b"this is not sqlite")
    again = make_app(engine=FakeEngine())
    async with again.run_test(size=SIZE):
        assert [c.title for c in again.store.list_chats()] == ["still works"]  # the same spare database


async def test_when_no_database_can_be_opened_the_app_still_chats_in_memory():
    locations.database_path().write_bytes(b"this is not sqlite" * 100)
    (locations.data_dir() / "chats-while-damaged.sqlite3").write_bytes(b"nor is this" * 100)
    app = make_app(engine=FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        assert any("in memory only" in n.message for n in app._notifications)
        await send(pilot, "still works")
        assert [c.title for c in app.store.list_chats()] == ["still works"]

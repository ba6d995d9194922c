"""Issue 13's defects, one test (or two) each, on the FakeEngine: what is highlighted is what the keys
act on, failed sends stay visible with a retry, narrow terminals, figures that belong to their
reply, the system prompt shown, the chat list's cursor and marks, panels that follow the chat, user
text as typed, `--fake` continue; and issue 11's untrusted strings (markup, escape sequences)."""
from __future__ import annotations

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, scripted_demo
from chatapp.chat.store import StoreError
from chatapp.tui.screens.chat import MIN_CHAT
from chatapp.tui.widgets.chat_list import ChatList
from chatapp.tui.widgets.compute import ComputePanel
from chatapp.tui.widgets.memory import MemoryPanel
from chatapp.tui.widgets.message import SELECTED_MARK, MessageView

from .conftest import SIZE, send, wait_until

pytestmark = pytest.mark.asyncio


def idle(app) -> bool:
    return app.chat_screen.streaming is None


def highlighted(app) -> list[str]:
    """Ids of the message views drawn as selected."""
    return [v.message.id for v in app.chat_screen.view.query(MessageView) if v.has_class("-selected")]


def header(app, message_id: str) -> str:
    return str(app.chat_screen.view.view_for(message_id).query_one(".header").render())


def screen_text(app) -> str:
    """Every character the terminal would get for the screen in front."""
    strips = app.screen._compositor.render_strips()
    return "\n".join("".join(seg.text for seg in strip) for strip in strips)


# 1. Selection and action agree.
async def test_regenerate_selects_the_new_reply_and_continue_extends_that_one(build):
    app = build(FakeEngine(["one two three four", "alpha beta gamma delta", " epsilon"]))
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 2
        await send(pilot, "q")
        conv = app.chat_screen.conv
        first = conv.path()[-1]
        await pilot.press("alt+up", "r")
        await wait_until(pilot, lambda: idle(app) and len(conv.messages) == 3, what="the regenerated reply")
        second = conv.path()[-1]
        assert second.id != first.id
        assert app.chat_screen.view.selected == second.id and highlighted(app) == [second.id]
        await pilot.press("c")
        await wait_until(pilot, lambda: idle(app) and second.content != "alpha beta", what="the continuation")
        assert second.content == "alpha beta epsilon" and first.content == "one two"
        assert highlighted(app) == [second.id]


async def test_after_an_edit_left_switches_the_branch_of_the_highlighted_message(build):
    app = build(FakeEngine(["first answer", "second answer"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "question one")
        conv = app.chat_screen.conv
        original = conv.path()[0]
        await pilot.press("alt+up", "up", "e")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "EditMessage")
        app.screen.query_one("TextArea").load_text("question two")
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: idle(app) and len(conv.messages) == 4, what="the edited branch's reply")
        edited = conv.path()[0]
        assert highlighted(app) == [edited.id] == [app.chat_screen.view.selected]
        await pilot.press("left")
        await wait_until(pilot, lambda: conv.path()[0].id == original.id, what="the branch switch")
        assert highlighted(app) == [original.id]
        assert "◀ 1/2 ▶" in header(app, original.id)


async def test_the_selection_is_always_drawn_and_a_click_moves_it(build):
    app = build(FakeEngine(["r1", "r2"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "p1")
        await send(pilot, "p2")
        path = app.chat_screen.conv.path()
        # Drawn while typing in the composer, not only once the list has focus.
        assert app.chat_screen.composer.has_focus and highlighted(app) == [path[-1].id]
        assert header(app, path[-1].id).startswith(SELECTED_MARK.strip())
        await pilot.press("alt+up")
        assert highlighted(app) == [path[-1].id]
        await pilot.click(f"#m-{path[0].id}")
        assert app.chat_screen.view.selected == path[0].id and highlighted(app) == [path[0].id]
        assert app.chat_screen.view.has_focus


async def test_delete_asks_only_when_replies_hang_below(build):
    app = build(FakeEngine(["a1", "a2"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "one")
        await send(pilot, "two")
        conv = app.chat_screen.conv
        last = conv.path()[-1]
        await pilot.press("alt+up", "d")  # the last reply: nothing below it
        await wait_until(pilot, lambda: last.id not in conv.messages, what="the delete")
        assert app.screen is app.chat_screen and highlighted(app) == [conv.path()[-1].id]
        await pilot.press("up", "up", "d")  # the first reply: a prompt hangs below it
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "Confirm")


# 2. A failed send stays in the tree, visibly, with a retry that reuses it.
async def test_a_prompt_too_long_for_the_context_is_marked_failed_and_retried_in_place(build):
    engine = FakeEngine(["fits now"], context_limit=40)
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        text = " ".join(f"w{i}" for i in range(60))
        app.chat_screen.composer.insert(text)
        await pilot.press("enter")
        conv = app.chat_screen.conv
        await wait_until(pilot, lambda: idle(app) and conv.messages and conv.path()[-1].status == "error",
                         what="the failure mark")
        prompt = conv.path()[-1]
        assert prompt.role == "user" and "tokens" in prompt.run["error"]
        view = app.chat_screen.view.view_for(prompt.id)
        assert "not sent" in header(app, prompt.id) and view.query_one(".failed").display
        assert prompt.run["error"] in str(view.query_one(".failed").render())
        engine.context_limit = 4096
        app.chat_screen.composer.insert(text)
        await pilot.press("enter")  # the same text again: a retry of the failed prompt, not a second copy
        await wait_until(pilot, lambda: idle(app) and conv.path()[-1].role == "assistant", what="the reply")
        assert [m.role for m in conv.path()] == ["user", "assistant"] and conv.path()[0].id == prompt.id
        assert prompt.status == "ok" and "error" not in prompt.run
        assert app.store.load(conv.id).get(prompt.id).status == "ok"


async def test_a_store_failure_keeps_the_prompt_marked_with_a_retry(build, store, monkeypatch):
    app = build(FakeEngine(["saved at last"]))
    async with app.run_test(size=SIZE) as pilot:
        real = store.save

        def refuse(conv):
            raise StoreError("database is locked")

        monkeypatch.setattr(store, "save", refuse)
        app.chat_screen.composer.insert("keep me")
        await pilot.press("enter")
        conv = app.chat_screen.conv
        await wait_until(pilot, lambda: conv.messages and conv.path()[-1].status == "error", what="the mark")
        prompt = conv.path()[-1]
        assert prompt.content == "keep me" and "database is locked" in prompt.run["error"]
        assert not app.chat_screen.live.busy and app.is_running
        monkeypatch.setattr(store, "save", real)
        await pilot.press("alt+up", "r")
        await wait_until(pilot, lambda: idle(app) and conv.path()[-1].role == "assistant", what="the retry")
        assert [m.content for m in store.load(conv.id).path()] == ["keep me", "saved at last"]


async def test_the_composer_warns_before_the_context_is_full(build):
    app = build(FakeEngine(["a b c d e f g h"], context_limit=120))
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 8
        await send(pilot, "short")
        assert not app.chat_screen.composer.border_subtitle
        await send(pilot, " ".join(f"w{i}" for i in range(50)))
        assert "context" in str(app.chat_screen.composer.border_subtitle)


# 4. A narrow terminal keeps a readable conversation.
@pytest.mark.parametrize("size", [(80, 24), (100, 30)])
async def test_narrow_terminals_collapse_panels_and_keep_the_chat_readable(build, size):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=size) as pilot:
        await send(pilot, "hello")
        main = app.chat_screen.query_one("#main")
        assert main.size.width >= MIN_CHAT
        await pilot.press("ctrl+t")  # the side panels on demand, in place of the chat list
        await pilot.pause()
        assert app.chat_screen.query_one("#side").display and not app.chat_screen.query_one(ChatList).display
        assert main.size.width >= MIN_CHAT


# 5. The steps readout describes its reply, with that reply's settings.
async def test_steps_readout_keeps_the_budget_its_reply_ran_with(build):
    app = build(FakeEngine(["a b c d"], controls=HUGINN_LIKE_CONTROLS))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        readout = app.chat_screen.query_one(ComputePanel).query_one(".readout")
        assert "max 32 of 32" in str(readout.render())
        field = app.chat_screen.query_one("#control-num_steps")
        field.value = "8"
        await field.action_submit()
        await pilot.pause()
        assert app.chat_screen.conv.controls["num_steps"] == 8
        assert "of 32" in str(readout.render()) and "of 8" not in str(readout.render())


# 6. What the model receives as its system prompt is on screen.
async def test_a_new_chat_shows_the_default_system_prompt(build):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE):
        system = app.chat_screen.view.query_one(".system")
        assert "You are a helpful assistant." in str(system.render())


async def test_a_model_change_updates_the_system_line_without_rebuilding_the_chat(build):
    # model_changed used to rebuild every message view, which raced a prompt sent meanwhile (its view was
    # remounted while it was read); now only the system line changes.
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi")
        prompt = app.chat_screen.conv.path()[0]
        view = app.chat_screen.view.view_for(prompt.id)
        app.chat_screen.conv.system_prompt = "Answer in French."
        app.chat_screen.model_changed()
        await wait_until(pilot, lambda: "Answer in French." in str(app.chat_screen.view.query_one(".system").render()),
                         what="the new system line")
        assert app.chat_screen.view.view_for(prompt.id) is view and view.is_attached
        assert len(app.chat_screen.view.query(".system")) == 1


async def test_the_markdown_export_names_the_default_system_prompt(build, tmp_path):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi")
        app.chat_screen.action_export_chat()
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextPrompt")
        app.screen.query_one("Input").value = str(tmp_path / "chat.md")
        await pilot.press("enter")
        await wait_until(pilot, lambda: (tmp_path / "chat.md").exists(), what="the export")
        text = (tmp_path / "chat.md").read_text(encoding="utf-8")
        assert 'system_prompt: "You are a helpful assistant."' in text
        assert "system_prompt_source: \"the model's default\"" in text
        app.chat_screen.action_export_chat()  # a mistyped folder is an error, not a new directory tree
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextPrompt")
        app.screen.query_one("Input").value = str(tmp_path / "typo" / "chat.md")
        await pilot.press("enter")
        await wait_until(pilot, lambda: any("does not exist" in n.message for n in app._notifications))
        assert not (tmp_path / "typo").exists()


# 7. The chat list shows its cursor, the open chat, and an empty search.
async def test_chat_list_cursor_open_mark_and_empty_search(build):
    app = build(FakeEngine(["r"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "older chat")
        await pilot.press("ctrl+n")
        await send(pilot, "newer chat")
        chat_list = app.chat_screen.query_one(ChatList)
        options = chat_list.options
        marked = [i for i in range(options.option_count)
                  if str(options.get_option_at_index(i).prompt).startswith(ChatList.OPEN_MARK)]
        assert marked == [0]  # the open chat, newest first
        await app.chat_screen.open_chat(options.get_option_at_index(1).id)
        await pilot.pause()
        options.focus()
        await pilot.pause()
        assert options.highlighted == 1  # the cursor starts on the open chat
        await pilot.press("up")
        assert options.highlighted == 0 and app.chat_screen.conv.title == "older chat"  # moved, not opened
        await pilot.press("ctrl+f", *"zzz")
        await wait_until(pilot, lambda: options.option_count == 0)
        assert "No chat matches “zzz”" in str(chat_list.query_one(".none").render())


# 8. Panels follow the chat on screen.
async def test_panels_start_over_for_another_chat(build):
    app = build(FakeEngine(["a b c d e f"], controls=HUGINN_LIKE_CONTROLS, steps=[5, 9]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "go")
        compute, memory = app.chat_screen.query_one(ComputePanel), app.chat_screen.query_one(MemoryPanel)
        first = app.chat_screen.conv.id
        assert compute.steps and "context " in str(memory.render()) and " 0 / " not in str(memory.render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert compute.steps == () and "after the next reply" in str(compute.query_one(".readout").render())
        assert "context    0 / 2,048 tokens" in str(memory.render())
        await app.chat_screen.open_chat(first)
        await pilot.pause()
        assert compute.steps == tuple(app.chat_screen.conv.path()[-1].run["steps"])


# 9. A prompt is shown as typed.
async def test_user_text_keeps_its_line_breaks(build):
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "line one\nline two\n  indented *not emphasis*")
        prompt = app.chat_screen.conv.path()[0]
        shown = str(app.chat_screen.view.view_for(prompt.id).query_one(".prompt").render())
        assert shown.splitlines() == ["line one", "line two", "  indented *not emphasis*"]


# 10. `--fake` continue goes on from the stopped text.
async def test_fake_demo_continue_goes_on_instead_of_starting_over(build):
    engine = scripted_demo()
    engine.instant = True
    app = build(engine)
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 6
        await send(pilot, "hi")
        reply = app.chat_screen.conv.path()[-1]
        cut = reply.content
        app.chat_screen.conv.settings["max_new_tokens"] = 500
        await pilot.press("alt+up", "c")
        await wait_until(pilot, lambda: idle(app) and reply.content != cut, what="the continuation")
        assert reply.content.startswith(cut) and reply.content.count("You asked") == 1
        assert reply.content.endswith("```")


# Issue 11 §4: user- and model-supplied strings are text, never markup or terminal control.
async def test_markup_and_escape_sequences_in_chat_data_are_shown_as_text(build, store):
    title = "[@click=app.quit]quit[/] [bold]x\x1b]2;pwned\x07"
    conv = Conversation(id="evil", title=title, model_id="fake")
    q = conv.add(None, "user", "[/] [@click=app.quit]click[/]\x1b[2J")
    conv.add(q.id, "assistant", "reply with [red]markup[/red] and \x1b]0;t\x07")
    store.save(conv)
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("evil")
        await pilot.pause()
        app.notify(title, title=title)
        await pilot.press("f8")  # the delete question quotes the title
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "Confirm")
        await pilot.pause()
        shown = screen_text(app)
        assert "\x1b" not in shown and "\x07" not in shown
        assert "[@click=app.quit]quit[/]" in shown
        await pilot.press("escape")
        await pilot.pause()
        shown = screen_text(app)
        assert "[/] [@click=app.quit]click[/]␛[2J" in shown and "[red]markup[/red]" in shown
        for widget in (app.chat_screen.query_one("#chat-header"), app.chat_screen.query_one(ChatList).options):
            await pilot.click(widget)
        await pilot.pause()
        assert app.is_running and "\x1b" not in screen_text(app)


# Rough edges.
async def test_a_restart_offers_the_last_chats_model_without_loading_it(build, store, catalog):
    conv = Conversation(id="old", title="From before", model_id="axiom")
    conv.add(None, "user", "hello")
    store.save(conv)
    app = build(engine=None)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.session is None  # nothing loaded unasked
        assert any(catalog["axiom"].name in n.message and "Ctrl+O" in n.message for n in app._notifications)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: app.screen.__class__.__name__ == "ModelsScreen")
        assert app.screen.entry.id == "axiom"


async def test_enter_while_a_reply_streams_says_why_and_keeps_the_text(build):
    app = build(FakeEngine([" ".join(["w"] * 300)], instant=False, tokens_per_s=100, ttft_s=0.0))
    async with app.run_test(size=SIZE) as pilot:
        app.chat_screen.conv.settings["max_new_tokens"] = 1000
        app.chat_screen.composer.insert("go")
        app.chat_screen.composer.action_send()
        await wait_until(pilot, lambda: app.chat_screen.live.busy and app.chat_screen.composer.busy)
        app.chat_screen.composer.insert("next question")
        app.chat_screen.composer.action_send()
        await pilot.pause()
        assert app.chat_screen.composer.text == "next question"
        assert any("still streaming" in n.message for n in app._notifications)
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat_screen.live.busy)


async def test_chat_list_detail_clips_the_model_name_not_the_message_count(build, store):
    conv = Conversation(id="long", title="Long model name", model_id="a-model-with-a-very-long-catalog-id")
    conv.add(conv.add(None, "user", "q").id, "assistant", "a")
    store.save(conv)
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        options = app.chat_screen.query_one(ChatList).options
        detail = str(options.get_option_at_index(0).prompt).split("\n")[1]
        assert "now · 2 msgs · a-model" in detail and detail.endswith("…")


async def test_switching_a_branch_keeps_the_switched_message_in_sight(build, store):
    conv = Conversation(id="long", title="Long", model_id="fake")
    first = conv.add(None, "user", "first question")
    long_reply = "\n\n".join(f"paragraph {i} of a long answer" for i in range(30))
    conv.add(first.id, "assistant", long_reply)
    conv.add(conv.current_leaf, "user", "follow-up")
    conv.add(conv.current_leaf, "assistant", long_reply)
    other = conv.add(None, "user", "first question, asked again")
    conv.add(other.id, "assistant", long_reply)
    store.save(conv)
    app = build(FakeEngine(["ok"]))
    async with app.run_test(size=SIZE) as pilot:
        await app.chat_screen.open_chat("long")
        await pilot.pause()
        view, shown_conv = app.chat_screen.view, app.chat_screen.conv
        view.focus()
        view.select(shown_conv.path()[0].id)
        await pilot.pause()
        await pilot.press("left")
        await wait_until(pilot, lambda: shown_conv.path()[0].id == first.id, what="the switch")
        await pilot.pause(0.1)
        shown = view.view_for(first.id)
        assert view.selected == first.id and shown.region.overlaps(view.region)

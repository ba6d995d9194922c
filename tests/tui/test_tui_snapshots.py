"""Snapshot tests (pytest-textual-snapshot) of every screen and of the compute and memory panels,
the chat screen at 80x24 and 200x50 and in every shipped theme, a selected message and a failed send.

Unless they say otherwise they run at 120x36 on the FakeEngine with fixed timings (instant mode), a fixed clock for the chat
list, no cursor blink, and conversations built from fixed data, so the pictures only change when
the UI does. Update with `pytest tests/tui --snapshot-update` only after reading the diff report.
"""
from __future__ import annotations

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeDownloader, FakeEngine
from chatapp.tui import streaming
from chatapp.tui.themes import load_themes, shipped_theme_dir

from .conftest import SIZE, ghost_fake, send, still, wait_until
from .test_tui_models import Gate, open_models

RUN = {"model_id": "fake", "new_tokens": 42, "stop_reason": "eos",
       "timings": {"ttft_s": 0.05, "prefill_tok_s": 812.0, "decode_tok_s": 97.5}}


@pytest.fixture(autouse=True)
def fixed_home_and_batches(monkeypatch):
    # The help screen prints the keys.toml path: keep it the same on every run.
    monkeypatch.setenv("SMOLLCHAT_HOME", "/tmp/smollchat-snapshots")
    # One batch per reply: how many 30 ms batches a reply takes depends on the machine's load, and
    # each batch adds a point to the memory sparkline.
    monkeypatch.setattr(streaming, "BATCH_S", 60.0)


def branched_chat() -> Conversation:
    """A chat with a regenerated reply (2 branches), a stopped reply and an own system prompt."""
    conv = Conversation(id="snap", title="Recurrent state vs KV cache", model_id="fake",
                        system_prompt="Answer briefly.", created_at=1.0)
    q = conv.add(None, "user", "Why does a recurrent model keep constant memory?", created_at=2.0)
    conv.add(q.id, "assistant", "Because it keeps a fixed-size state.", run=dict(RUN), created_at=3.0)
    conv.add(q.id, "assistant", "Its state is a **fixed-size matrix** per layer:\n\n"
             "- the KV cache grows with every token\n- the recurrent state does not",
             run={**RUN, "new_tokens": 27}, created_at=4.0)
    q2 = conv.add(conv.current_leaf, "user", "And a transformer?", created_at=5.0)
    conv.add(q2.id, "assistant", "A transformer stores keys and values for every", status="stopped",
             run={**RUN, "new_tokens": 9, "stop_reason": "cancelled"}, created_at=6.0)
    return conv


async def open_saved(pilot, chat_id: str) -> None:
    await pilot.app.chat_screen.open_chat(chat_id)
    await pilot.pause()
    still(pilot.app)


def test_chat_screen_empty(build, snap_compare):
    """You should see the chat list (empty), a blank conversation with the hint, the composer with its
    placeholder, and on the right the fake model (cpu · float32) with its memory panel; no compute panel."""
    app = build(FakeEngine())

    async def run_before(pilot):
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_chat_screen_with_branches_stopped_reply_and_figures(build, store, snap_compare):
    """You should see 'Recurrent state vs KV cache' in the list, the system prompt line, the second of
    two replies marked ◀ 2/2 ▶ with its figures (27 tokens · TTFT 50 ms · prefill 812 tok/s ·
    decode 97.5 tok/s · end of turn), and a last reply marked ■ stopped ('stopped by you')."""
    store.save(branched_chat())
    app = build(FakeEngine())

    async def run_before(pilot):
        pilot.app.chat_screen.query_one("ChatList").reload()
        await open_saved(pilot, "snap")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_memory_panel_constant_state_next_to_the_ghost(build, snap_compare):
    """You should see the memory panel after three turns: weights, a constant 64 KiB recurrent state
    (flat state line) and the dense-transformer ghost growing with the context (12 layers x 768)."""
    engine = ghost_fake(["one two three four five six seven eight"], kv_bytes_per_token=0, recurrent_bytes=65536)
    app = build(engine)

    async def run_before(pilot):
        for prompt in ("first", "second", "third"):
            await send(pilot, prompt)
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_compute_panel_with_steps_strip(build, snap_compare):
    """You should see the compute panel built from the Huginn-like controls (steps 32, early exit kl,
    threshold, minimum steps, continuous compute switch) and, after a reply, steps/token mean and max,
    the per-token strip and the share saved by early exit; the KV cache grows in the memory panel."""
    engine = FakeEngine(["the quick brown fox jumps over the lazy dog"], controls=HUGINN_LIKE_CONTROLS,
                        steps=[32, 12, 7, 5, 20, 9, 6, 4, 11, 3])
    app = build(engine)

    async def run_before(pilot):
        await pilot.pause()
        pilot.app.chat_screen.query_one("#control-exit_criterion").value = "kl"
        await pilot.pause()
        await send(pilot, "go")
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_models_screen(build, snap_compare):
    """You should see every catalog model with architecture, params, download size, context, licence
    and status: demos 'demo · random weights', axiom 'partial 1.9 MiB', the others 'not downloaded';
    the detail of the highlighted model below."""
    downloader = FakeDownloader()
    downloader.done["axiom"] = 2_000_000
    app = build(downloader=downloader)

    async def run_before(pilot):
        await open_models(pilot, "odinnext")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_models_screen_download_in_progress(build, snap_compare):
    """You should see odinnext 'downloading 50%', a half-full progress bar and the transfer line
    '1.9 MiB / 3.8 MiB · 1.9 MiB/s · ETA 1.0 s · model.safetensors'."""
    downloader = Gate(chunk_bytes=1_000_000, speed_bps=2_000_000)
    app = build(downloader=downloader)

    async def run_before(pilot):
        screen = await open_models(pilot, "odinnext")
        await pilot.press("d")
        await wait_until(pilot, lambda: "odinnext" in screen.progress)
        downloader.step.release()
        await wait_until(pilot, lambda: screen.progress["odinnext"].done_bytes >= 2_000_000)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    for _ in range(5):
        downloader.step.release()  # let the worker thread finish


def test_models_screen_offline(build, snap_compare):
    """You should see one red line under the table: 'Axiom-Dense-380M-Instruct: Offline: axiom: no
    network connection and the files are not downloaded'."""
    app = build(downloader=FakeDownloader(offline=True))

    async def run_before(pilot):
        screen = await open_models(pilot, "axiom")
        await pilot.press("d")
        await wait_until(pilot, lambda: not screen.cancels and str(screen.query_one("#models-message").render()))

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help_screen(build, snap_compare):
    """You should see the help text and the first bindings by scope, each with keys, description and id."""
    app = build()
    assert snap_compare(app, terminal_size=SIZE, press=["f1"])


def test_settings_dialog(build, snap_compare):
    """You should see the chat settings: the default-system-prompt switch on with the model's default
    text greyed, the preset select, and the sampling fields with the model's defaults as placeholders."""
    app = build(FakeEngine())

    async def run_before(pilot):
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "ChatSettings")
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_edit_message_dialog(build, store, snap_compare):
    """You should see the editor over the chat, titled 'Edit user message: saving adds a new branch
    beside it', holding the prompt text."""
    store.save(branched_chat())
    app = build(FakeEngine())

    async def run_before(pilot):
        await open_saved(pilot, "snap")
        await pilot.press("alt+up", "up", "e")
        await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "EditMessage")
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_confirm_dialog(build, store, snap_compare):
    """You should see the delete question ('Delete “Recurrent state vs KV cache”?', 'Every branch of it
    is removed.') with Cancel focused and a red Delete button."""
    store.save(branched_chat())
    app = build(FakeEngine())

    async def run_before(pilot):
        await open_saved(pilot, "snap")
        await pilot.press("f8")
        await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "Confirm")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_rename_prompt(build, store, snap_compare):
    """You should see the one-line prompt 'Rename chat' holding the current title."""
    store.save(branched_chat())
    app = build(FakeEngine())

    async def run_before(pilot):
        await open_saved(pilot, "snap")
        await pilot.press("f2")
        await wait_until(pilot, lambda: pilot.app.screen.__class__.__name__ == "TextPrompt")
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


THEMES = sorted(t.name for t in load_themes([shipped_theme_dir()])[0])


async def branched_with_selection(pilot) -> None:
    """The branched chat open, the message list focused and the first reply (◀ 2/2 ▶) selected."""
    pilot.app.chat_screen.query_one("ChatList").reload()
    await open_saved(pilot, "snap")
    await pilot.press("alt+up", "up", "up")
    await pilot.pause()


@pytest.mark.parametrize("size", [(80, 24), (200, 50)])
def test_chat_screen_narrow_and_wide(build, store, snap_compare, size):
    """80x24: the side panels collapse, the chat list and a readable conversation remain; 200x50: all
    three columns, the conversation widest. Both show the selected reply (▶ mark, tinted) and the
    branch line under the conversation ('reply 2 of 2 here')."""
    store.save(branched_chat())
    app = build(FakeEngine())
    assert snap_compare(app, terminal_size=size, run_before=branched_with_selection)


@pytest.mark.parametrize("theme", THEMES)
def test_chat_screen_in_every_theme(build, store, snap_compare, theme):
    """Each shipped theme on the branched chat with a selected reply: readable labels in the memory
    panel (smoll-light drew them white on near-white), the ▶ mark and tint on the selection."""
    store.save(branched_chat())
    app = build(ghost_fake())

    async def run_before(pilot):
        pilot.app.theme = theme
        await branched_with_selection(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_failed_send_is_marked_with_its_reason_and_retry(build, snap_compare):
    """A prompt longer than the context: it stays in the chat marked '✕ not sent', with the reason
    (tokens needed vs held) and 'r retries this message (in place)'; the composer is empty."""
    app = build(FakeEngine(context_limit=40))

    async def run_before(pilot):
        pilot.app.chat_screen.composer.insert(" ".join(f"word{i}" for i in range(40)))
        await pilot.press("enter")
        conv = pilot.app.chat_screen.conv
        await wait_until(pilot, lambda: conv.messages and conv.path()[-1].status == "error")
        pilot.app.clear_notifications()
        still(pilot.app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)

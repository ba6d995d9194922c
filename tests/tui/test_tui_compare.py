"""The compare screen on the FakeEngine: F3 and the palette open it, two settings of one model run one after
the other and the screen says so, two models that fit the budget run side by side, keeping one side adds
one sibling with its run card, keeping both adds two; snapshots at 80x24 and wide; contrast in every theme."""
from __future__ import annotations

import pytest

from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, fake_entry
from chatapp.tui.screens.compare import CompareScreen

from .conftest import send, still, wait_until
from .test_tui_contrast import THEMES, low_contrast


def huginn_fake(**kw) -> FakeEngine:
    return FakeEngine(["one two three four five six"], controls=HUGINN_LIKE_CONTROLS, tokens_per_s=50.0,
                      ttft_s=0.05, kv_bytes_per_token=1024, recurrent_bytes=64 * 1024, **kw)


async def open_compare(pilot) -> CompareScreen:
    app = pilot.app
    await send(pilot, "how deep should you think?")
    await pilot.press("f3")
    await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
    return app.screen


async def run_both(pilot, screen: CompareScreen) -> None:
    await pilot.press("ctrl+r")
    await wait_until(pilot, lambda: screen.results and not screen.pending, what="both sides")


def text(screen, selector: str) -> str:
    return str(screen.query_one(selector).render())


@pytest.mark.asyncio
async def test_two_settings_of_one_model_run_one_after_the_other_and_keep_one_adds_one_sibling(build, store):
    app = build(huginn_fake())
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_compare(pilot)
        assert "One after the other: both sides use one engine (fake)" in text(screen, "#compare-plan")
        await run_both(pilot, screen)
        plan = text(screen, "#compare-plan")
        assert "One after the other" in plan and "a keeps A, b keeps B, k keeps both" in plan
        a, b = screen.results["A"], screen.results["B"]
        assert a.figures()["steps_per_token"] == 4 and b.figures()["steps_per_token"] == 32
        assert "4.0 steps/token" in text(screen, "#pane-A .pane-figures")
        assert "32.0 steps/token" in text(screen, "#pane-B .pane-figures")
        assert "Model pool:" in text(screen, "#compare-pool") and "8.0 GiB" in text(screen, "#compare-pool")
        conv = app.chat_screen.conv
        question = screen.question.id
        assert len(conv.children(question)) == 1, "running changes nothing in the chat"
        await pilot.press("b")
        await wait_until(pilot, lambda: app.screen is app.chat_screen, what="back to the chat")
        replies = conv.children(question)
        assert len(replies) == 2
        kept = replies[-1]
        assert conv.current_leaf == kept.id and app.chat_screen.view.selected == kept.id
        assert kept.run["controls"]["num_steps"] == 32 and kept.run["steps"] == [32] * len(kept.token_ids)
        assert kept.run["compare"]["side"] == "B" and kept.run["compare"]["with"] == "fake num_steps=4"
        saved = store.load(conv.id).get(kept.id)
        assert saved.run["compare"] == kept.run["compare"] and saved.content == kept.content
        assert store.token_records([kept.id])[kept.id]["ids"] == kept.token_ids


@pytest.mark.asyncio
async def test_keep_both_adds_two_siblings_each_with_its_own_run_card(build):
    app = build(huginn_fake())
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_compare(pilot)
        await run_both(pilot, screen)
        question = screen.question.id
        await pilot.press("k")
        await wait_until(pilot, lambda: app.screen is app.chat_screen, what="back to the chat")
        replies = app.chat_screen.conv.children(question)
        assert len(replies) == 3
        assert [r.run["compare"]["side"] for r in replies[1:]] == ["A", "B"]
        assert [r.run["controls"]["num_steps"] for r in replies[1:]] == [4, 32]
        assert replies[1].run["seed"] and replies[1].run["prompt_sha256"] == replies[2].run["prompt_sha256"]


@pytest.mark.asyncio
async def test_two_models_that_fit_the_budget_stream_at_once(build):
    other = fake_entry("other", name="Other fake")
    app = build(huginn_fake(), loader=lambda entry, progress, quantize=None: huginn_fake(entry=entry))
    app.pool.entries["other"] = other
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_compare(pilot)
        screen.models.append("other")
        select = screen.query_one("#model-B")
        select.set_options([(m, m) for m in screen.models])
        select.value = "other"
        await pilot.pause()
        assert "Side by side: both engines fit the 8.0 GiB memory budget together" in text(screen, "#compare-plan")
        await run_both(pilot, screen)
        assert screen.results["B"].reply.run["model_id"] == "other"
        assert set(app.pool.slots) == {"fake", "other"} and "2 engine(s)" in text(screen, "#compare-pool")


@pytest.mark.asyncio
async def test_two_models_over_the_budget_run_one_after_the_other(build):
    app = build(huginn_fake(), loader=lambda entry, progress, quantize=None: huginn_fake(entry=entry), memory_budget=30 * 2**20)
    app.pool.entries["other"] = fake_entry("other")
    async with app.run_test(size=(100, 30)) as pilot:
        screen = await open_compare(pilot)
        screen.models.append("other")
        screen.query_one("#model-B").set_options([(m, m) for m in screen.models])
        screen.query_one("#model-B").value = "other"
        await pilot.pause()
        assert "do not fit the 30.0 MiB memory budget together" in text(screen, "#compare-plan")


@pytest.mark.asyncio
async def test_bad_words_say_what_to_fix_and_compare_needs_a_question(build):
    app = build(huginn_fake())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        await pilot.pause()
        assert app.screen is app.chat_screen  # an empty chat: nothing to compare
        screen = await open_compare(pilot)
        screen.query_one("#words-B").value = "temperature=hot"
        await pilot.pause()
        assert "temperature expects a number" in text(screen, "#compare-plan")
        await pilot.press("ctrl+r")
        await pilot.pause()
        assert not screen.results
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.chat_screen, what="back to the chat")


@pytest.mark.asyncio
async def test_the_palette_lists_compare(build):
    app = build(huginn_fake())
    async with app.run_test(size=(100, 30)) as pilot:
        await send(pilot, "hi")
        titles = [c.title for c in app.get_system_commands(app.chat_screen)]
        assert "Compare two answers" in titles
        await pilot.press("f3")
        await wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), what="the compare screen")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Run both", "Keep A", "Keep B", "Keep both"} <= set(titles)


def _snap_app(build):
    return build(huginn_fake(instant=True))


@pytest.mark.parametrize("size", [(80, 24), (160, 40)])
def test_compare_screen_snapshot(build, snap_compare, size, monkeypatch):
    """You should see the question in the header, the two setups (fake num_steps=4 | fake num_steps=32), the
    plan line saying they ran one after the other on one engine and how to keep, the model pool's use of its
    8.0 GiB budget, and both replies with their figures (tokens, tok/s, 4.0 vs 32.0 steps/token, state)."""
    monkeypatch.setenv("SMOLLCHAT_HOME", "/tmp/smollchat-snapshots")
    app = _snap_app(build)

    async def run_before(pilot):
        screen = await open_compare(pilot)
        await run_both(pilot, screen)
        await pilot.pause()
        still(pilot.app)

    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.asyncio
@pytest.mark.parametrize("theme", THEMES)
async def test_compare_screen_text_meets_wcag_aa(build, theme):
    app = build(huginn_fake())
    async with app.run_test(size=(100, 30)) as pilot:
        app.theme = theme
        screen = await open_compare(pilot)
        await run_both(pilot, screen)
        bad = low_contrast(app, "compare")
        screen.query_one("#words-B").value = "bogus"  # the plan line's error colour
        await pilot.pause()
        bad += low_contrast(app, "compare error")
    assert not bad, "\n".join(bad)

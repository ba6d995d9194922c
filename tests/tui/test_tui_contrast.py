"""WCAG AA contrast (4.5:1 for text) of everything the TUI draws, in every shipped theme.

The check reads the screen as the terminal gets it (the compositor's strips: each run of text with
its final foreground and background, after CSS, component classes, auto colours and transparency),
so it covers every widget's colours as drawn, including Textual's own widgets as styled here, and the
token inspector's five level inks (each theme's tok-0 .. tok-4) with its cursor and panel. Box
and block glyphs (borders, bars, sparklines: U+2500-U+259F) are graphics, not text, and are left out.
"""
from __future__ import annotations

import math

import pytest
from textual.color import Color

from chatapp.chat.fake import HUGINN_LIKE_CONTROLS
from chatapp.tui import tokens as tk
from chatapp.tui.themes import load_themes, shipped_theme_dir

from .conftest import SIZE, ghost_fake, send, wait_until
from .test_tui_snapshots import branched_chat

THEMES = sorted(t.name for t in load_themes([shipped_theme_dir()])[0])
AA_TEXT = 4.5
GRAPHICS = range(0x2500, 0x25A0)


def luminance(c: Color) -> float:
    def channel(v: int) -> float:
        s = v / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4
    return 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b)


def contrast(a: Color, b: Color) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula_matches_wcag_reference_points():
    assert contrast(Color(0, 0, 0), Color(255, 255, 255)) == pytest.approx(21.0)
    assert contrast(Color(119, 119, 119), Color(255, 255, 255)) == pytest.approx(4.48, abs=0.01)


def low_contrast(app, where: str) -> list[str]:
    """Every run of text on the screen in front whose contrast is under AA, described."""
    bad = []
    for y, strip in enumerate(app.screen._compositor.render_strips()):
        for seg in strip:
            text = "".join(ch for ch in seg.text if not ch.isspace() and ord(ch) not in GRAPHICS)
            style = seg.style
            if not text or style is None or style.color is None or style.bgcolor is None:
                continue
            fg, bg = Color.from_rich_color(style.color), Color.from_rich_color(style.bgcolor)
            if style.reverse:
                fg, bg = bg, fg
            if style.dim:  # terminals draw dim text at about half intensity
                fg = bg.blend(fg, 0.5)
            ratio = contrast(fg, bg)
            if ratio < AA_TEXT:
                bad.append(f"{where} row {y}: {text[:24]!r} {fg.hex} on {bg.hex} = {ratio:.2f}")
    return bad


def reply_record(screen):
    return screen.inspector.current.record


@pytest.mark.asyncio
@pytest.mark.parametrize("theme", THEMES)
async def test_every_drawn_text_meets_wcag_aa(build, store, theme):
    store.save(branched_chat())
    # Chosen-token probabilities that give the token inspector every colour level, sure to unsure.
    probs = [math.log(p) for p in (0.99, 0.7, 0.4, 0.2, 0.05)]
    engine = ghost_fake(["a b c d e"], controls=HUGINN_LIKE_CONTROLS, steps=[5, 9, 32], context_limit=60,
                        logprobs=probs)
    app = build(engine)
    bad: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        app.theme = theme
        screen = app.chat_screen
        await screen.open_chat("snap")
        await send(pilot, "how big is the state?")
        screen.composer.insert(" ".join(f"w{i}" for i in range(80)))  # too long: a failed send
        await pilot.press("enter")
        await wait_until(pilot, lambda: screen.conv.path()[-1].status == "error", what="the failed send")
        for severity in ("information", "warning", "error"):
            app.notify(f"a {severity} toast", title=severity, severity=severity)
        await pilot.press("alt+up", "up")  # the list focused, a reply selected
        await pilot.pause()
        bad += low_contrast(app, "chat")
        screen.query_one("#control-num_steps").focus()  # a focused compact field (its tint)
        await pilot.pause()
        bad += low_contrast(app, "compute field")
        # The token inspector on the reply: every level's ink, the cursor, the panel; then by steps.
        reply = next(m for m in reversed(screen.conv.path()) if m.role == "assistant")
        screen.view.focus()
        screen.view.select(reply.id)
        await pilot.press("t")
        await wait_until(pilot, lambda: screen.inspector.current is not None, what="the inspector")
        levels = {tk.group_level(reply_record(screen), g, "prob", 32) for g in screen.inspector.current.groups}
        assert levels == set(range(tk.LEVELS))
        bad += low_contrast(app, "inspector")
        await pilot.press("n", "c", "c")
        await pilot.pause()
        bad += low_contrast(app, "inspector by steps")
        await pilot.press("escape")
        await wait_until(pilot, lambda: screen.inspector.current is None, what="the inspector closed")
        for key, name, where in (("ctrl+s", "ChatSettings", "settings"), ("f1", "HelpScreen", "help"),
                                 ("f8", "Confirm", "confirm"), ("ctrl+o", "ModelsScreen", "models")):
            await pilot.press(key)
            await wait_until(pilot, lambda: app.screen.__class__.__name__ == name, what=name)
            await pilot.pause()
            bad += low_contrast(app, where)
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.screen is screen, what="back to the chat")
    assert not bad, "\n".join(bad)

"""One side of the compare screen: what it runs, where it stands, its reply as it streams, its figures.

The reply is shown as plain text (textsafe: a model's escape sequences never reach the terminal); the
figures line is the comparison itself: tokens, tok/s, recurrence steps per token, state bytes.
"""
from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static

from ...textsafe import plain
from ...units import human_bytes


def figures_line(f: dict[str, Any]) -> str:
    """"42 tokens · 38.5 tok/s · 4.0 steps/token · state 6.0 MiB" (the parts that are known)."""
    parts = [f"{f.get('tokens') or 0} tokens"]
    if f.get("tok_s"):
        parts.append(f"{f['tok_s']:.1f} tok/s")
    if f.get("steps_per_token") is not None:
        parts.append(f"{f['steps_per_token']:.1f} steps/token")
    if f.get("state_bytes") is not None:
        parts.append(f"state {human_bytes(f['state_bytes'])}")
    return " · ".join(parts)


class ComparePane(Vertical):
    """Title (side and setup), status, reply, figures."""

    DEFAULT_CSS = """
    ComparePane { width: 1fr; height: 1fr; border: round $panel; padding: 0 1; }
    ComparePane.-kept { border: round $success; }
    ComparePane > .pane-title { text-style: bold; color: $text; height: 1; text-wrap: nowrap; text-overflow: ellipsis; }
    ComparePane > .pane-status { color: $text-muted; height: auto; }
    ComparePane > .pane-status.-error { color: $text-error; }
    ComparePane > VerticalScroll { height: 1fr; }
    ComparePane .pane-reply { color: $text; }
    ComparePane > .pane-figures { color: $text-accent; height: auto; }
    """

    def __init__(self, label: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.label = label
        self._text = ""

    def compose(self) -> ComposeResult:
        yield Static(f"{self.label}", classes="pane-title")
        yield Static("", classes="pane-status")
        with VerticalScroll():
            yield Static("", classes="pane-reply")
        yield Static("", classes="pane-figures")

    def setup(self, describe: str) -> None:
        self.query_one(".pane-title", Static).update(plain(f"{self.label}  {describe}"))

    def status(self, text: str, error: bool = False) -> None:
        status = self.query_one(".pane-status", Static)
        status.update(plain(text))
        status.set_class(error, "-error")

    def reply(self, text: str, figures: dict[str, Any] | None) -> None:
        if text != self._text:
            self._text = text
            self.query_one(".pane-reply", Static).update(plain(text))
            scroll = self.query_one(VerticalScroll)
            if scroll.max_scroll_y - scroll.scroll_y <= 2:  # anchored at the end unless the reader scrolled up
                scroll.scroll_end(animate=False)
        self.query_one(".pane-figures", Static).update(figures_line(figures) if figures else "")

    def clear(self) -> None:
        self._text = ""
        self.set_class(False, "-kept")
        self.query_one(".pane-reply", Static).update("")
        self.query_one(".pane-figures", Static).update("")

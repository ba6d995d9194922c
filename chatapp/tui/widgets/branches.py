"""The branch navigator: where the selected message sits among its siblings (edits and regenerations
are siblings), and the switch between them.

It shows one line under the conversation while the selected message has siblings; ← → in the
message list, Alt+← → anywhere, or a click on ◀ ▶ switch. The switch changes the tree's current
branch and posts `Switched` with the sibling now shown, which the screen shows and selects.
"""
from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Static

from ...textsafe import plain
from .message import ROLE_LABELS


class BranchNavigator(Horizontal):
    DEFAULT_CSS = """
    BranchNavigator { height: 1; padding: 0 1; display: none; }
    BranchNavigator.-shown { display: block; }
    BranchNavigator .arrow { width: 3; color: $text-accent; text-style: bold; }
    BranchNavigator .where { width: 1fr; color: $text-muted; }
    """

    @dataclass
    class Switched(Message):
        """The tree now shows `message_id` (a sibling of the message that was selected)."""

        conv_id: str
        message_id: str

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.conv = None
        self.message_id: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("◀", id="branch-prev", classes="arrow")
        yield Static("", classes="where")
        yield Static("▶", id="branch-next", classes="arrow")

    def follow(self, conv, message_id: str | None) -> None:
        """Track the selected message of `conv` (None: nothing selected)."""
        self.conv, self.message_id = conv, message_id
        if conv is None or message_id is None or message_id not in conv.messages:
            self.set_class(False, "-shown")
            return
        i, n = conv.sibling_index(message_id)
        self.set_class(n > 1, "-shown")
        if n > 1:
            role = ROLE_LABELS.get(conv.get(message_id).role, "")
            what = "reply" if role == "Model" else "message"
            self.query_one(".where", Static).update(
                plain(f"{what} {i + 1} of {n} · ← → or Alt+← → switch"))

    def switch(self, delta: int) -> bool:
        """Show the sibling `delta` places away; False when there is none to switch to."""
        conv, mid = self.conv, self.message_id
        if conv is None or mid is None or mid not in conv.messages:
            return False
        i, n = conv.sibling_index(mid)
        if n < 2 or not 0 <= i + delta < n:
            return False
        chosen = conv.switch_sibling(mid, delta)
        self.post_message(self.Switched(conv.id, chosen.id))
        return True

    def on_click(self, event: events.Click) -> None:
        target = event.widget.id if event.widget is not None else None
        if target in ("branch-prev", "branch-next"):
            self.switch(-1 if target == "branch-prev" else 1)

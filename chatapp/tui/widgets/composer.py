"""The composer: a TextArea where Enter sends, Shift+Enter (or Ctrl+J) adds a line, and Up/Down at
the first/last line recall earlier prompts."""
from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message
from textual.reactive import reactive
from textual.widgets import TextArea

from textual import events

from ..keys import bindings, keys_for


class Composer(TextArea):
    """The prompt box. Posts `Composer.Submitted`; never sends an empty prompt."""

    DEFAULT_CSS = """
    Composer {
        height: auto;
        min-height: 3;
        max-height: 12;
        border: round $primary 50%;
        padding: 0 1;
        background: $surface;
    }
    Composer:focus { border: round $primary; }
    Composer.-busy { border: round $warning 60%; }
    """

    BINDINGS = bindings("composer")

    busy: reactive[bool] = reactive(False)
    """True while a reply streams: Enter then says so and keeps the text for the next turn."""

    @dataclass
    class Submitted(Message):
        """The user sent a prompt."""

        composer: "Composer"
        text: str

    def __init__(self, prompts: list[str] | None = None, **kw) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", highlight_cursor_line=False,
                         **kw)
        self.prompts: list[str] = list(prompts or [])
        """Earlier prompts, oldest first."""
        self._recall: int | None = None
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        # Send and newline are decided here, in key order. As priority bindings they would run at
        # the app as soon as Enter arrives, while keys typed before it still wait in this widget's
        # queue (a fast typist or a paste-like burst sent half a line).
        keymap = getattr(self.app, "keymap", {})
        if event.key in keys_for("composer.send", keymap).split(","):
            event.stop()
            event.prevent_default()
            self.action_send()
        elif event.key in keys_for("composer.newline", keymap).split(","):
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def watch_busy(self, busy: bool) -> None:
        self.set_class(busy, "-busy")

    def action_send(self) -> None:
        text = self.text.strip()
        if not text:
            return
        if self.busy:
            self.notify("A reply is still streaming: your text stays here until it ends (Esc stops it).",
                        severity="warning", timeout=4)
            return
        self.prompts.append(text)
        self._recall = None
        self.load_text("")
        self.post_message(self.Submitted(self, text))

    def action_newline(self) -> None:
        start, end = self.selection
        self._replace_via_keyboard("\n", start, end)

    def action_history(self, delta: int) -> None:
        """Recall an earlier prompt when the cursor sits on the first (or last) line, else move."""
        row = self.cursor_location[0]
        at_edge = row == 0 if delta < 0 else row == self.document.line_count - 1
        if not at_edge or not self.prompts or (delta > 0 and self._recall is None):
            self.action_cursor_up() if delta < 0 else self.action_cursor_down()
            return
        if self._recall is None:
            self._draft = self.text
            self._recall = len(self.prompts)
        self._recall = max(0, self._recall + delta)
        if self._recall >= len(self.prompts):
            self._recall = None
            self.load_text(self._draft)
        else:
            self.load_text(self.prompts[self._recall])
        self.move_cursor(self.document.end if delta > 0 else (0, len(self.document[0])))

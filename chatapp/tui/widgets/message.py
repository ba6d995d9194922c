"""One message of the conversation: a header (role, branch position, status, selection mark), the
body, and under a reply its run figures (tokens, TTFT, prefill and decode speed, stop reason).

A reply's body is Markdown, drawn by widgets/streaming_body.py's MarkdownBody (one widget of cached lines, not
Textual's Markdown widget: see there); a prompt is shown as typed (line breaks and all), as plain text. Every
string here comes from a user or a model, so it reaches the screen through `textsafe` only.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from ...textsafe import displayable, plain
from ..figures import human_duration, run_line
from .streaming_body import MarkdownBody, OpenTail

ROLE_LABELS = {"user": "You", "assistant": "Model", "system": "System"}
STATUS_LABELS = {"streaming": "● streaming", "stopped": "■ stopped", "error": "✕ error"}
#: The mark before the selected message's header (besides its background), so the selection reads
#: the same in every theme and without colour.
SELECTED_MARK = "▶ "


def failed_send(message) -> bool:
    """A prompt whose reply could not be started (too long, the store failed): shown with its
    reason, retried in place by `r`."""
    return message.role == "user" and message.status == "error"


class MessageView(Vertical):
    """Shows one `chat.conversation.Message`; the live reply streams into its body through `write`, its open
    block drawn again as it grows until the reply ends (widgets/streaming_body.py)."""

    DEFAULT_CSS = """
    MessageView {
        height: auto;
        padding: 0 1;
        border-left: outer $primary 40%;
    }
    MessageView.-assistant { border-left: outer $secondary; }
    MessageView.-selected { background: $primary 12%; border-left: thick $accent; }
    ConversationView:focus MessageView.-selected { background: $primary 25%; }
    MessageView .header { color: $text-muted; text-style: bold; height: 1; }
    MessageView.-assistant .header { color: $text-secondary; }
    MessageView.-user .header { color: $text-primary; }
    MessageView.-stopped .header, MessageView.-error .header { color: $text-warning; }
    MessageView .prompt { height: auto; margin-bottom: 1; }
    MessageView .stats { color: $text-muted; height: auto; margin-bottom: 1; }
    MessageView .failed { color: $text-error; height: auto; margin-bottom: 1; }
    /* The last block's bottom margin is the gap to the next message (a :last-child rule to drop it
       would restyle every block of a streaming reply on each mount). */
    """

    @dataclass
    class Clicked(Message):
        """The message was clicked: the list selects it."""

        message_id: str

    def __init__(self, message, sibling: tuple[int, int] = (0, 1), live: bool = False) -> None:
        super().__init__(id=f"m-{message.id}", classes=f"-{message.role}")
        self.live = live
        """Streaming: the body starts empty and grows only through `write` (the worker keeps
        extending `message.content`, which must not be shown twice)."""
        self.message = message
        """The chat-layer Message shown (its content may grow while streaming)."""
        self.sibling = sibling
        """(index, count) among the message's siblings: a branch point when count > 1."""
        self.selected = False
        self._open: OpenTail | None = None
        self._froze = False  # gc.freeze() called for this stream, not yet undone
        self._live_figures = ""

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="header")
        if self.message.role == "assistant":
            yield MarkdownBody("" if self.live else displayable(self.message.content or ""))
            yield Static(self._stats(), classes="stats")
        else:
            yield Static(plain(self.message.content or ""), classes="prompt")
            yield Static(self._failure(), classes="failed")

    def on_mount(self) -> None:
        self._mark_status()

    def on_click(self, event: events.Click) -> None:
        self.post_message(self.Clicked(self.message.id))

    @property
    def body(self) -> MarkdownBody:
        return self.query_one(MarkdownBody)

    async def open_inspector(self, inspector: Widget) -> None:
        """Show the reply token by token (widgets/inspector.py) in place of its Markdown body."""
        await self.close_inspector()
        self.body.display = False
        await self.mount(inspector, after=self.body)

    async def close_inspector(self) -> None:
        for old in self.query("TokenInspector"):
            await old.remove()
        self.body.display = True

    def _header(self) -> object:
        m = self.message
        parts = [SELECTED_MARK.strip() if self.selected else "", ROLE_LABELS.get(m.role, m.role)]
        i, n = self.sibling
        if n > 1:
            parts.append(f"◀ {i + 1}/{n} ▶")
        status = "✕ not sent" if failed_send(m) else STATUS_LABELS.get(m.status)
        if status:
            parts.append(status)
        if self._live_figures:
            parts.append(self._live_figures)
        return plain("  ".join(p for p in parts if p))

    def _stats(self) -> object:
        if self.message.status == "streaming":
            return plain("")  # the header carries the live counters until the run card is complete
        run = self.message.run or {}
        line = run_line(run)
        if self.message.status == "error" and run.get("error"):
            line = f"{line} · {run['error']}" if line else run["error"]
        return plain(line)

    def _failure(self) -> object:
        if not failed_send(self.message):
            return plain("")
        reason = self.message.run.get("error") or "the reply could not be started"
        return plain(f"{reason}\nr retries this message (in place); e edits it into a new branch.")

    def _mark_status(self) -> None:
        for status in ("streaming", "stopped", "error"):
            self.set_class(self.message.status == status, f"-{status}")
        if self.message.role != "assistant":
            failed = self.query_one(".failed", Static)
            failed.display = failed_send(self.message)

    def set_selected(self, selected: bool) -> None:
        if selected != self.selected:
            self.selected = selected
            self.set_class(selected, "-selected")
            self.query_one(".header", Static).update(self._header(), layout=False)

    def refresh_message(self, sibling: tuple[int, int] | None = None) -> None:
        """Redraw header, body and figures after the message changed (status, run card, branch count)."""
        if sibling is not None:
            self.sibling = sibling
        self._live_figures = ""
        self._mark_status()
        self.query_one(".header", Static).update(self._header())
        if self.message.role == "assistant":
            self.query_one(".stats", Static).update(self._stats())
        else:
            self.query_one(".prompt", Static).update(plain(self.message.content or ""))
            self.query_one(".failed", Static).update(self._failure())

    def show_live(self, new_tokens: int, elapsed_s: float, ttft_s: float | None) -> None:
        """Live counters while streaming (the final run card replaces them)."""
        rate = new_tokens / elapsed_s if elapsed_s > 0 else 0.0
        self._live_figures = f"{new_tokens} tok · {rate:.1f} tok/s"
        if ttft_s is not None:
            self._live_figures += f" · TTFT {human_duration(ttft_s)}"
        # One line whatever it says: repaint without a layout pass.
        self.query_one(".header", Static).update(self._header(), layout=False)

    @property
    def shown_chars(self) -> int:
        """Characters of the reply's text on screen (while streaming: the frozen pieces and the tail)."""
        return len(self.body.source)

    async def write(self, text: str) -> None:
        """Append streamed text to the body (widgets/streaming_body.py): each finished block (and the first part
        of a long open one) is rendered once, and only the open block, the tail, is rendered again on each
        write."""
        text = displayable(text)
        body = self.body
        if self._open is None:  # the text already shown becomes the open tail
            self._open = OpenTail(body.source)
            body.clear()
        pieces = self._open.add(text)
        body.show(pieces, self._open.source, self._open.shown)
        if pieces:
            # A long reply's drawn lines are long-lived objects by the hundred thousand, and each full pass of the
            # cyclic garbage collector walks them all: at 20,000 tokens such passes stopped the UI for 0.2-0.6 s
            # several times a reply (bench/tui.md). Frozen (gc.freeze: moved out of the collector's generations,
            # in constant time), they are skipped; the end of the stream hands them back (_thaw).
            gc.freeze()
            self._froze = True

    def _thaw(self) -> None:
        """Give the objects frozen while this reply streamed back to the collector (garbage among them, such as
        cycles that died meanwhile, is collected by its next full pass)."""
        if self._froze:
            gc.unfreeze()
            self._froze = False

    def on_unmount(self) -> None:
        self._thaw()  # a view removed while streaming (the chat closed, the reply deleted)

    async def finish(self) -> None:
        """Draw the stored text as a finished reply is drawn (MarkdownBody.settle: the blocks frozen while
        streaming keep their lines; a block split while streaming, shown with its split, and the tail are
        rendered again whole; a stored text that differs from the streamed one is rendered in full)."""
        self.live = False
        if self.message.role == "assistant":
            self._open = None
            self.body.settle(displayable(self.message.content or ""))
        self._thaw()  # once the reply's last lines are rendered
        self.refresh_message()

"""One message of the conversation: a header (role, branch position, status), the Markdown body,
and under a reply its run figures (tokens, TTFT, prefill and decode speed, stop reason)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from ..figures import displayable, human_duration, run_line

ROLE_LABELS = {"user": "You", "assistant": "Model", "system": "System"}
STATUS_LABELS = {"streaming": "● streaming", "stopped": "■ stopped", "error": "✕ error"}


class MessageView(Vertical):
    """Shows one `chat.conversation.Message`; the live reply streams into it through MarkdownStream."""

    DEFAULT_CSS = """
    MessageView {
        height: auto;
        padding: 0 1;
        border-left: outer $primary 40%;
    }
    MessageView.-assistant { border-left: outer $secondary; }
    MessageView.-selected { background: $boost; border-left: outer $accent; }
    MessageView .header { color: $text-muted; text-style: bold; height: 1; }
    MessageView.-assistant .header { color: $secondary; }
    MessageView.-user .header { color: $primary; }
    MessageView.-stopped .header, MessageView.-error .header { color: $warning; }
    MessageView .stats { color: $text-muted; height: auto; margin-bottom: 1; }
    /* The last block's bottom margin is the gap to the next message (a :last-child rule to drop it
       would restyle every block of a streaming reply on each mount). */
    MessageView Markdown { margin: 0; padding: 0; background: transparent; }
    """

    def __init__(self, message, sibling: tuple[int, int] = (0, 1), live: bool = False) -> None:
        super().__init__(id=f"m-{message.id}", classes=f"-{message.role}")
        self.live = live
        """Streaming: the body starts empty and grows only through `write` (the worker keeps
        extending `message.content`, which must not be shown twice)."""
        self.message = message
        """The chat-layer Message shown (its content may grow while streaming)."""
        self.sibling = sibling
        """(index, count) among the message's siblings: a branch point when count > 1."""
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Static(self._header(), classes="header", markup=False)
        yield Markdown("" if self.live else displayable(self.message.content or ""), open_links=False)
        if self.message.role == "assistant":
            yield Static(self._stats(), classes="stats", markup=False)

    @property
    def body(self) -> Markdown:
        return self.query_one(Markdown)

    def _header(self, live: str = "") -> str:
        m = self.message
        parts = [ROLE_LABELS.get(m.role, m.role)]
        i, n = self.sibling
        if n > 1:
            parts.append(f"◀ {i + 1}/{n} ▶")
        status = STATUS_LABELS.get(m.status)
        if status:
            parts.append(status)
        if live:
            parts.append(live)
        return "  ".join(parts)

    def _stats(self) -> str:
        if self.message.status == "streaming":
            return ""  # the header carries the live counters until the run card is complete
        run = self.message.run or {}
        line = run_line(run)
        if self.message.status == "error" and run.get("error"):
            line = f"{line} · {run['error']}" if line else run["error"]
        return line

    def refresh_message(self, sibling: tuple[int, int] | None = None) -> None:
        """Redraw header and figures after the message changed (status, run card, branch count)."""
        if sibling is not None:
            self.sibling = sibling
        for status in ("streaming", "stopped", "error"):
            self.set_class(self.message.status == status, f"-{status}")
        self.query_one(".header", Static).update(self._header())
        if self.message.role == "assistant":
            self.query_one(".stats", Static).update(self._stats())

    def show_live(self, new_tokens: int, elapsed_s: float, ttft_s: float | None) -> None:
        """Live counters while streaming (the final run card replaces them)."""
        rate = new_tokens / elapsed_s if elapsed_s > 0 else 0.0
        live = f"{new_tokens} tok · {rate:.1f} tok/s"
        if ttft_s is not None:
            live += f" · TTFT {human_duration(ttft_s)}"
        # One line whatever it says: repaint without a layout pass.
        self.query_one(".header", Static).update(self._header(live), layout=False)

    async def write(self, text: str) -> None:
        """Append streamed text; MarkdownStream batches appends when rendering falls behind."""
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        await self._stream.write(displayable(text))

    async def finish(self) -> None:
        """Stop the stream and render the stored text once in full (an append-only render can
        leave a block that closed late, such as a code fence, showing stale content)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        self.live = False
        await self.body.update(displayable(self.message.content or ""))
        self.refresh_message()

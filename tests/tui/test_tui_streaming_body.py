"""A streaming reply's body stays bounded (widgets/streaming_body.py): it is shown by a few Statics of which
only the tail is re-rendered, nothing is dropped, and the end renders the whole text in the Markdown
widget as every finished reply is shown."""
from __future__ import annotations

import pytest
from markdown_it import MarkdownIt
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.geometry import Region

from chatapp.chat.conversation import Message
from chatapp.tui.widgets.message import MessageView
from chatapp.tui.widgets.streaming_body import FREEZE_CHARS, FrozenText, finished_prefix


def reply_text(blocks: int) -> str:
    """Chat-like Markdown: paragraphs, headings, lists with loose items, quotes and code fences."""
    out = []
    for b in range(blocks):
        kind = b % 6
        if kind == 0:
            out.append(f"## Part {b}")
        elif kind == 2:
            out.append("\n".join(f"- item{b}.{i}" for i in range(6)) + f"\n\n- loose{b}\n  continued")
        elif kind == 3:
            out.append(f"```python\n\nx{b} = 1\n\ny{b} = 2\n```")
        elif kind == 4:
            out.append(f"> quoted{b}\nlazy line{b}")
        else:
            out.append(" ".join(f"word{b}_{i}" for i in range(30)))
    return "\n\n".join(out)


def top_level(text: str) -> list[tuple[str, str]]:
    """(token type, inline content) of the whole parse: what the text renders as."""
    return [(t.type, t.content) for t in MarkdownIt("gfm-like").parse(text) if t.type != "inline" or t.content]


def test_the_finished_prefix_never_changes_how_the_text_parses():
    text, parser = reply_text(40), MarkdownIt("gfm-like")
    for end in range(0, len(text), 97):
        part = text[:end]
        cut = finished_prefix(part, parser)
        # The cut falls at the start of a line, before the last top-level block only.
        assert cut == 0 or part[cut - 1] == "\n"
        # The prefix and the rest parse as the whole does (nothing merged, nothing split)...
        assert top_level(part[:cut]) + top_level(part[cut:]) == top_level(part)
        # ...and the prefix is what the finished text starts with, block for block.
        assert top_level(text).__getitem__(slice(len(top_level(part[:cut])))) == top_level(part[:cut])


class Host(App):
    def __init__(self, message: Message) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield MessageView(self.message, live=True)


@pytest.mark.asyncio
async def test_a_long_streamed_reply_keeps_few_widgets_and_drops_nothing():
    text = reply_text(180)  # ~500 widgets once rendered in full as Markdown
    message = Message(id="r1", parent_id=None, role="assistant", content="", created_at=0.0, status="streaming")
    app = Host(message)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(MessageView)
        await pilot.pause()
        step, most_widgets, longest_tail = 700, 0, 0
        for start in range(0, len(text), step):
            message.content += text[start:start + step]
            await view.write(text[start:start + step])
            pieces = list(view.query(FrozenText))
            # Not counting the pieces (one per FREEZE_CHARS at most), the view's widgets stay few.
            most_widgets = max(most_widgets, len(view.query("*")) - len(pieces))
            longest_tail = max(longest_tail, len(pieces[-1].text))
            # Everything written is on screen, once: the pieces (the tail last), in order.
            assert "".join(p.text for p in pieces) == message.content
            assert view.shown_chars == len(message.content)
        await pilot.pause()
        # Bounded by the tail, not by the reply: the whole reply rendered as Markdown is ~1,000 widgets.
        assert longest_tail < FREEZE_CHARS + 2 * step
        assert most_widgets <= 8
        assert len(pieces) <= len(text) // FREEZE_CHARS + 2
        # Scrolled to the top mid-stream, the first piece shows the reply's beginning.
        first = pieces[0]
        lines = first.render_lines(Region(0, 0, first.size.width, 3))
        assert "Part 0" in "".join(strip.text for strip in lines)

        message.status = "ok"
        await view.finish()
        await pilot.pause()
        assert not view.query(FrozenText) and view.body.source == text and view.body.display
        full = len(view.query("*"))
        assert full > 5 * most_widgets  # the final view is the full Markdown widget, as for any finished reply

        # The same reply opened finished (not streamed) renders the same widget tree.
        again = MessageView(Message(id="r2", parent_id=None, role="assistant", content=text, created_at=1.0))
        await app.query_one(VerticalScroll).mount(again)
        await pilot.pause()
        assert [type(w).__name__ for w in again.body.query("*")] == [type(w).__name__ for w in view.body.query("*")]

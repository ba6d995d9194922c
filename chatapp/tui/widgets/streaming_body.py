"""A reply's body while it streams: a few `FrozenText` Statics drawn with Rich's Markdown in place of
Textual's Markdown widget; only the last one (the tail) is re-rendered as text arrives.

Why: Textual's Markdown widget is one widget per block (and per list item, and per code block). In
bench/tui_stream.py a 20,000-token reply grew to over a thousand of them; every paint re-laid out and
re-arranged all of them, and mounting each new block cost style matching: a paint cost more the
longer the reply was, and the display fell seconds behind. Here the tail's blocks are left behind
once a later top-level block has started (CommonMark never changes a block after that) and they
hold at least FREEZE_CHARS: that piece is not rendered again, and a new tail piece starts. So one
paint re-renders at most about FREEZE_CHARS plus the open block, and the widget count grows by one
per piece.

While streaming the reply is drawn by Rich's Markdown renderer (the text and the blocks are the same,
the styling a little plainer). When it ends `MessageView.finish` drops the pieces and renders the
stored text once in full with the Markdown widget, as every finished reply is shown.
"""
from __future__ import annotations

from markdown_it import MarkdownIt
from rich.markdown import Markdown as RichMarkdown
from textual.containers import Vertical
from textual.widgets import Static

#: Leave the tail's finished blocks in their piece once they hold at least this many characters: the
#: tail re-rendered on each paint then holds at most about this much text plus the open block.
FREEZE_CHARS = 3_000


def finished_prefix(text: str, parser: MarkdownIt) -> int:
    """How many leading characters of `text` are top-level Markdown blocks that later text can no
    longer change: everything before the last top-level block (0 when there is only one)."""
    last_start = None
    for token in parser.parse(text):
        if token.level == 0 and token.map is not None:
            last_start = token.map[0]
    if not last_start:
        return 0
    return sum(len(line) for line in text.splitlines(keepends=True)[:last_start])


class FrozenText(Static):
    """A piece of a streaming reply: the tail (re-rendered as text arrives), or finished blocks."""

    DEFAULT_CSS = "FrozenText { height: auto; margin: 0 0 1 0; }"

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def show(self, text: str) -> None:
        self.text = text
        self.update(RichMarkdown(text, hyperlinks=False))


class FrozenBlocks(Vertical):
    """The pieces of a streaming reply, in place of the (hidden) Markdown body."""

    DEFAULT_CSS = "FrozenBlocks { height: auto; }"

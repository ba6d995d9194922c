"""A reply's body while it streams: the finished Markdown blocks frozen into a few `FrozenText`
widgets, only the tail that can still change in the live Markdown widget.

Why: Textual's Markdown widget is one widget per block (and per list item, and per code block). In
bench/tui_stream.py a 20,000-token reply grew to over a thousand of them, and every paint of the growing
reply re-laid out, restyled and re-arranged all of them: a paint cost more the longer the reply
was, and the display fell seconds behind. Here a block is frozen once a later top-level block has
started (CommonMark never changes a block after that), in pieces of at least FREEZE_CHARS, each
piece one Static rendered once with Rich's Markdown. So one paint re-renders at most the tail
(bounded by FREEZE_CHARS plus the open block), and the widget count grows by one per piece instead
of one per block.

While streaming the frozen pieces are drawn by Rich's Markdown renderer, not Textual's widget (the
text and the blocks are the same, the styling a little plainer). When the reply ends
`MessageView.finish` drops the pieces and renders the stored text once in full with the Markdown
widget, as every finished reply is shown.
"""
from __future__ import annotations

from markdown_it import MarkdownIt
from rich.markdown import Markdown as RichMarkdown
from textual.containers import Vertical
from textual.widgets import Static

#: Freeze the tail's finished blocks once they hold at least this many characters: the live Markdown
#: widget then holds at most about this much text plus the open block (a few hundred tokens).
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
    """Finished blocks of a streaming reply, rendered once."""

    DEFAULT_CSS = "FrozenText { height: auto; margin: 0 0 1 0; }"

    def __init__(self, text: str) -> None:
        super().__init__(RichMarkdown(text, hyperlinks=False))
        self.text = text


class FrozenBlocks(Vertical):
    """The frozen pieces, above the live Markdown tail, while the reply streams."""

    DEFAULT_CSS = "FrozenBlocks { height: auto; }"

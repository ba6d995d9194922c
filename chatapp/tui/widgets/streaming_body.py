"""A reply's body: one widget that draws Markdown from cached lines, for a streaming reply (`StreamingBody`) and a
finished one (`MarkdownBody`). Its text is kept as pieces, each rendered once with Rich's Markdown into lines
that are kept; while streaming the tail (the open block) is rendered again when it changes; only the lines on
screen are drawn.

Why: Textual's Markdown widget is one widget per block (and per list item, and per code block). In
bench/tui_stream.py a 20,000-token reply grew to over a thousand of them; every paint re-laid out and
re-arranged all of them, and mounting each new block cost style matching. A first fix (Statics of
>= 3,000 characters in a container, the last one re-rendered) still rendered the tail twice a paint (for its
height, then to draw it) and the container's lines once more, and the paint pacing then stretched the
frames, so each paint had more to render: the display fell 0.3-2 s behind (bench/tui.md). Now:

- A top-level block leaves the tail as soon as a later one has started (CommonMark never changes a block
  after that; `finished_prefix`): it is rendered once, at the width the layout asks for (again, once, when
  the width or the theme changes).
- The open block is bounded too (`OpenTail`): past OPEN_CHARS a paragraph, code (fenced or indented), list
  or quote is split (at a line; a list between items, a quote at a quoted line) and its first part frozen;
  a split fence is closed in the frozen part and reopened in the tail, so both draw as code. A table, a
  heading or one line with no space stays whole.

So a paint renders the new text once plus the open block's last <= OPEN_CHARS, whatever the reply's length.
The blank line between two pieces (and before the tail) is set as Rich sets the one between their blocks
(`joins`), once the block after it is known, so a streaming reply draws as a full render would, except
inside a split block. When the reply ends, `MessageView.finish` settles the body (`MarkdownBody.settle`): the
whole blocks frozen while streaming keep their lines, what an append-only render draws otherwise than a full
render (a block split while streaming, shown with its split, and the open tail) is rendered again whole;
text that differs from what streamed is rendered in full. A finished reply is drawn the same way, not by Textual's
Markdown widget: that mounted ~650 widgets in 1.3 s for a 2,000-token reply and ~6,400 in 17 s for a
20,000-token one (the UI frozen meanwhile, at the end of every long reply and when a chat holding one
opened), where Rich renders the same text into lines in 0.07 and 0.29 s.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from markdown_it import MarkdownIt
from rich.markdown import Markdown as RichMarkdown
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Size
from textual.selection import Selection
from textual.strip import Strip
from textual.visual import Visual, visualize
from textual.widget import Widget

#: An open block longer than this (characters) is split and its first part frozen (see OpenTail).
OPEN_CHARS = 1_500
#: Block types split at a line (paragraph, code), and between list items (a quote: at a quoted line).
_LINE_SPLIT = ("paragraph_open", "fence", "code_block")
_PART_SPLIT = ("bullet_list_open", "ordered_list_open")


def line_starts(text: str) -> list[int]:
    """Where each line of `text` starts, as the parser counts lines (at "\n" only: str.splitlines also
    splits at characters such as U+2028 that Markdown reads as text)."""
    starts = [0]
    at = text.find("\n")
    while at != -1:
        starts.append(at + 1)
        at = text.find("\n", at + 1)
    return starts


def finished_prefix(text: str, parser: MarkdownIt) -> int:
    """How many leading characters of `text` are top-level Markdown blocks that later text can no
    longer change: everything before the last top-level block (0 when there is only one)."""
    return finished_blocks(text, parser)[0]


def top_blocks(tokens: list) -> list[tuple[str, list[int]]]:
    """The top-level blocks of a parsed text: (type, line map), the type as `_kind` names it."""
    return [(_kind(tokens, i), t.map) for i, t in enumerate(tokens) if t.level == 0 and t.map is not None]


def _kind(tokens: list, i: int) -> str:
    """The type of the top-level block opened by tokens[i], for joins: a quote or heading with nothing in it apart."""
    t = tokens[i]
    if t.type == "blockquote_open" and tokens[i + 1].type == "blockquote_close":
        return "blockquote_empty"
    if t.type == "heading_open" and not tokens[i + 1].content:
        return "heading_empty"
    return t.type


def finished_blocks(text: str, parser: MarkdownIt) -> tuple[int, tuple[str, str]]:
    """finished_prefix, and the types of the first and last top-level blocks in that prefix (`Piece.ends`)."""
    tops = top_blocks(parser.parse(text))
    if not tops or not tops[-1][1][0]:
        return 0, ("", "")
    # (Blank lines alone before a first block are a prefix of no block.)
    return line_starts(text)[tops[-1][1][0]], (tops[0][0], tops[-2][0]) if len(tops) > 1 else ("", "")


def block_ends(text: str, parser: MarkdownIt) -> tuple[str, str]:
    """The types of the first and last top-level blocks of `text` (`Piece.ends`)."""
    tops = top_blocks(parser.parse(text))
    return (tops[0][0], tops[-1][0]) if tops else ("", "")


@dataclass(frozen=True)
class Piece:
    """A frozen part of the reply: `source` (its characters of the reply's text) drawn as `shown` (the
    source, with a split code fence closed or reopened); `gap`: a blank line follows (a whole block does,
    the first part of a split block does not); `ends`: the token types of its first and last top-level
    blocks, as parsed when it was frozen (for `joins`; None where not known)."""

    source: str
    shown: str
    gap: bool = True
    ends: tuple[str, str] | None = None


def split_open_block(text: str, parser: MarkdownIt) -> tuple[int, str, str]:
    """Where a single open top-level block can be split so that its first part can be drawn alone: (cut,
    close, reopen), text[:cut] + close drawn as the frozen part, reopen + text[cut:] as the rest; cut 0
    when it cannot be split. The split is the last one that leaves the block's last line in the rest."""
    tokens = parser.parse(text)
    if not tokens or tokens[0].map is None:
        return 0, "", ""
    block = tokens[0]
    starts = line_starts(text.rstrip("\n"))  # the block's last line: the last one with text
    if block.type in _LINE_SPLIT:
        # A fence keeps its opening line and at least one line of code in the frozen part.
        boundaries = starts[2 if block.type == "fence" else 1:]
        if len(starts) == 1 and block.type == "paragraph_open":  # one long line: split at a space
            space = text.rfind(" ", 0, len(text.rstrip()))
            boundaries = [space + 1] if space > 0 else []
    elif block.type == "blockquote_open":  # at a quoted line (a lazy one continues the line before)
        boundaries = [at for at in starts[1:] if text[at:at + 4].lstrip(" ").startswith(">")]
    elif block.type in _PART_SPLIT:  # a list between its items
        boundaries = [starts[t.map[0]] for t in tokens
                      if t.level == 1 and t.nesting == 1 and t.map is not None and 0 < t.map[0] < len(starts)]
    else:
        return 0, "", ""
    if not boundaries:
        return 0, "", ""
    cut = max(boundaries)
    if block.type == "fence":
        return cut, block.markup + "\n", text[:starts[1]]
    return cut, "", ""


#: The blank line between two pieces, as Rich draws the one between two blocks (the widget's background).
BLANK = Strip([])
#: Rich draws a blank line before an element when the element closed just before it leaves one pending (every
#: kind but a rule, `hr`). For a list, quote or table that element is its own last child, so it draws that blank
#: line itself, even first, and drawn alone it has it already: no blank line is added before them; nor before a
#: heading with no text yet (drawn alone it is two blank lines, one standing for that blank line). Every other
#: block (a quote with nothing in it too) follows a blank line unless the block before it is a rule. Streaming
#: passes through such empty blocks ("#", ">" before their text arrives); tests/tui/test_tui_streaming_body.py
#: checks every state of a stream of every pair of block kinds against a full render.
_OWN_BLANK = ("bullet_list_open", "ordered_list_open", "blockquote_open", "table_open", "heading_empty")


def joins(ends: list[tuple[str, str]]) -> list[bool]:
    """For texts of whole top-level blocks drawn alone, given the types of each one's first and last block
    (`block_ends`), whether a blank line follows each where they are drawn one after another as Rich draws
    them joined (False for the last, and after a text with no block)."""
    return [_joined(ends[i][1], ends[i + 1][0]) for i in range(len(ends) - 1)] + [False]


def _joined(last: str, first: str) -> bool:
    """Whether Rich draws a blank line of the text's own between a block of type `last` and one of type `first`
    that follows it."""
    return last not in ("hr", "") and first not in _OWN_BLANK


def _blank_between(piece: Piece, first: str | None) -> bool:
    """Whether a blank line follows `piece` where what comes after it starts with a block of type `first` (None:
    not known): never after the first part of a split block; as Rich joins the two where both types are known."""
    if not piece.gap:
        return False
    return piece.ends is None or first is None or _joined(piece.ends[1], first)


def _first_block(parsed: list) -> str | None:
    """The type of the first top-level block of a parsed text (None without one)."""
    return next((kind for kind, _ in top_blocks(parsed)), None)


class StreamMarkdown(RichMarkdown):
    """Rich's Markdown, parsed by one shared parser: Rich builds a new MarkdownIt for every Markdown it
    makes (about 1 ms), more than parsing the open block it is made for. The fields are those Rich's own
    __init__ sets with hyperlinks off (tests/tui/test_tui_streaming_body.py checks both draw alike)."""

    _parser = MarkdownIt().enable("strikethrough").enable("table")

    def __init__(self, markup: str) -> None:  # not super().__init__: that builds the parser again
        self.markup = markup
        self.parsed = self._parser.parse(markup)
        self.code_theme = self.inline_code_theme = "monokai"
        self.justify, self.style, self.hyperlinks, self.inline_code_lexer = None, "none", False, None


class OpenTail:
    """The text of a streaming reply not frozen yet, and what leaves it: `add` takes new text and returns
    the pieces to freeze; `shown` is the tail as drawn (a reopened fence first), `source` its characters."""

    def __init__(self, source: str = "", open_chars: int = OPEN_CHARS) -> None:
        self.source = source
        self.reopen = ""
        self.open_chars = open_chars
        self._parser = MarkdownIt("gfm-like")

    @property
    def shown(self) -> str:
        return self.reopen + self.source

    def add(self, text: str) -> list[Piece]:
        self.source += text
        pieces = []
        shown = self.shown
        cut, ends = finished_blocks(shown, self._parser)
        if cut > len(self.reopen):
            pieces.append(Piece(self.source[:cut - len(self.reopen)], shown[:cut], ends=ends))
            self.source, self.reopen = shown[cut:], ""
        if len(self.source) > self.open_chars:
            shown = self.shown
            cut, close, reopen = split_open_block(shown, self._parser)
            if cut > len(self.reopen):
                pieces.append(Piece(self.source[:cut - len(self.reopen)], shown[:cut] + close, gap=False))
                self.source, self.reopen = shown[cut:], reopen
        return pieces


class StreamingBody(Widget):
    """A reply's body drawn from cached lines: the frozen pieces, each rendered once into lines at the layout's
    width (again, once, when the width or the theme changes), then the tail, rendered once per change; only
    the lines on screen are drawn. One widget, no container: every paint resizes the body, and each widget
    resized is redrawn (a container's lines cost as much as text)."""

    DEFAULT_CSS = "StreamingBody { height: auto; }"

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[Piece] = []
        self.tail = ""
        """The tail's characters of the reply's text."""
        self._tail_shown = ""
        self._lines: list[Strip] = []
        self._rendered = 0  # pieces in _lines
        # Lines of each rendered piece in _lines, and whether a blank line follows it there: set when what follows
        # is known (the next piece, rendered; for the last one, the tail adds it to its own lines).
        self._counts: list[int] = []
        self._blanks: list[bool] = []
        self._width = 0
        self._tail_lines: list[Strip] = []
        self._tail_key: tuple[int, str] | None = None

    @property
    def frozen_text(self) -> str:
        return "".join(p.source for p in self.pieces)

    @property
    def text(self) -> str:
        """All the reply's text this body shows, in order."""
        return self.frozen_text + self.tail

    def show(self, pieces: list[Piece], tail: str, shown: str | None = None) -> None:
        """Freeze `pieces` after those shown and show `tail` (drawn as `shown` where that differs, e.g. a
        reopened code fence) after them."""
        self.pieces.extend(pieces)
        self.tail, self._tail_shown = tail, tail if shown is None else shown
        self.refresh(layout=True)

    def _markdown(self, text: str, width: int) -> tuple[list[Strip], str | None]:
        """`text` drawn at `width`, and the type of its first top-level block."""
        markdown = StreamMarkdown(text)
        return Visual.to_strips(self, visualize(self, markdown), width, None, self.visual_style), _first_block(markdown.parsed)

    def _markdown_lines(self, text: str, width: int) -> list[Strip]:
        return self._markdown(text, width)[0]

    def _add_lines(self, piece: Piece, lines: list[Strip]) -> None:
        """Append a piece's drawn lines to the rendered ones, after the blank line that follows the piece before
        it where Rich would draw one (both pieces' block types are known now)."""
        if self._counts:
            self._blanks.append(_blank_between(self.pieces[len(self._counts) - 1], piece.ends and piece.ends[0]))
            if self._blanks[-1]:
                self._lines.append(BLANK)
        self._lines.extend(lines)
        self._counts.append(len(lines))

    def _render_to(self, width: int) -> tuple[list[Strip], list[Strip]]:
        if width != self._width:
            self._lines, self._counts, self._blanks, self._rendered, self._width = [], [], [], 0, width
            self._tail_key = None
        for piece in self.pieces[self._rendered:]:
            self._add_lines(piece, self._markdown_lines(piece.shown, width))
        if self._rendered != len(self.pieces):
            self._rendered, self._tail_key = len(self.pieces), None
        if self._tail_key != (width, self._tail_shown):
            self._tail_key = (width, self._tail_shown)
            lines, first = self._markdown(self._tail_shown, width) if self._tail_shown else ([], None)
            # The blank line after the last piece, as the tail's first block joins it (the tail's lines hold it).
            lead = [BLANK] if self.pieces and self._tail_shown and _blank_between(self.pieces[-1], first) else []
            self._tail_lines = lead + lines + [Strip.blank(width, self.visual_style.rich_style)]  # the gap to what follows
        return self._lines, self._tail_lines

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        if not width:
            return 0
        frozen, tail = self._render_to(width)
        return len(frozen) + len(tail)

    def render_line(self, y: int) -> Strip:
        frozen, tail = self._render_to(self.size.width)
        if y < len(frozen):
            strip = frozen[y]
        elif y - len(frozen) < len(tail):
            strip = tail[y - len(frozen)]
        else:
            return Strip.blank(self.size.width, self.visual_style.rich_style)
        # Text selection with the mouse, as Textual's own widgets have it: each cell carries its offset, and the
        # selected span of the line is drawn in the screen's selection style.
        selection = self.text_selection
        span = selection.get_span(y) if selection is not None else None
        if span is not None:
            start, end = span
            end = strip.cell_length if end == -1 else min(end, strip.cell_length)
            style = self.screen.get_component_rich_style("screen--selection")
            chosen = Strip([Segment(text, (seg_style or Style()) + style, control)
                            for text, seg_style, control in strip.crop(start, end)])
            strip = Strip.join([strip.crop(0, start), chosen, strip.crop(end)])
        return strip.apply_offsets(0, y)

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        """The selected text, as drawn (lines without their trailing padding)."""
        frozen, tail = self._render_to(self.size.width)
        return selection.extract("\n".join(line.text.rstrip() for line in frozen + tail)), "\n"

    def selection_updated(self, selection: Selection | None) -> None:
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._width = 0  # a theme change: render again with the new styles


class MarkdownBody(StreamingBody):
    """A reply's body, finished or streaming (MessageView writes into it through `show`): `update` replaces the
    whole text with one piece, rendered once per width; `source` is the text shown."""

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.update(source)

    @property
    def source(self) -> str:
        return self.text

    def clear(self) -> None:
        """Show nothing (a stream then starts from an empty body)."""
        self.pieces, self.tail, self._tail_shown = [], "", ""
        self._lines, self._counts, self._blanks, self._rendered, self._tail_key = [], [], [], 0, None

    def update(self, source: str) -> None:
        self.clear()
        self.show([Piece(source, source, gap=False)] if source else [], "")

    def settle(self, source: str) -> None:
        """The end of a stream: draw `source` as `update` draws it, rendering again only what may draw otherwise.

        A whole block frozen while streaming was rendered alone, and Rich draws a block alone as it draws it
        within the text (CommonMark never changes a block once a later one has started), so its lines stay.
        A block split while streaming (its parts up to the piece that closed it) becomes one piece, rendered
        again, and so does the open tail. The blank lines between the pieces are set as Rich sets them (`joins`).
        The end of a 20,000-token reply then renders those blocks only, not 160,000 characters (1.0 s, the UI
        frozen). Text that differs from what streamed (the stored reply, trimmed) is rendered in full."""
        if source != self.text or not self.pieces:
            self.update(source)
            return
        width = self._width
        if width:
            self._render_to(width)  # pieces frozen since the last paint
        kept: list[tuple[Piece, list[Strip] | None]] = []  # each piece, with its lines (no gap) where they stay
        run: list[str] = []
        y = 0
        for i, piece in enumerate(self.pieces):
            count = self._counts[i] if width else 0
            if run or not piece.gap:
                run.append(piece.source)
                if piece.gap:  # the piece that closed a split block: the block whole
                    kept.append((Piece("".join(run), "".join(run)), None))
                    run = []
            else:
                kept.append((piece, self._lines[y:y + count] if width else None))
            y += count + (width and i < len(self._blanks) and self._blanks[i])
        if rest := "".join(run) + self.tail:
            kept.append((Piece(rest, rest), None))
        # Block types as parsed when frozen; the merged pieces are parsed here.
        ends = [piece.ends or block_ends(piece.source, StreamMarkdown._parser) for piece, _ in kept]
        self.clear()
        self.pieces = [replace(piece, gap=gap, ends=e) for (piece, _), gap, e in zip(kept, joins(ends), ends)]
        if width:
            for piece, (_, lines) in zip(self.pieces, kept):
                self._add_lines(piece, self._markdown_lines(piece.shown, width) if lines is None else lines)
            self._width, self._rendered = width, len(self.pieces)
        self.refresh(layout=True)

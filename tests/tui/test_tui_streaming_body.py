"""A streaming reply's body stays bounded (widgets/streaming_body.py): finished blocks are rendered once into
lines, only the open block (itself split past OPEN_CHARS) is rendered again, nothing is dropped, and the end
renders the whole text once, drawn as every finished reply is, in the same one widget."""
from __future__ import annotations

import pytest
from markdown_it import MarkdownIt
from rich.console import Console
from rich.markdown import Markdown as RichMarkdown
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.geometry import Region

from chatapp.chat.conversation import Message
from chatapp.tui.widgets.message import MessageView
from chatapp.tui.widgets.streaming_body import (OPEN_CHARS, _blank_between, OpenTail, StreamingBody, StreamMarkdown,
                                                finished_prefix)


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




def test_the_prefix_counts_lines_as_the_parser_does():
    # U+2028 and U+0085 are text to Markdown (str.splitlines would count a line at each).
    text = "one\u2028still one\x85and still\n\ntwo\n\nthree"
    cut = finished_prefix(text, MarkdownIt("gfm-like"))
    assert text[cut:] == "three"


def feed(text: str, step: int, open_chars: int = OPEN_CHARS):
    """Stream `text` through an OpenTail `step` characters at a time; check after every step that the frozen
    pieces and the tail hold all the text, once, in order. Returns (pieces, the longest tail seen)."""
    tail, pieces, longest = OpenTail(open_chars=open_chars), [], 0
    for start in range(0, len(text), step):
        pieces += tail.add(text[start:start + step])
        assert "".join(p.source for p in pieces) + tail.source == text[:start + step]
        longest = max(longest, len(tail.source))
    return pieces, tail, longest


def one_block_kinds():
    """Single blocks far longer than OPEN_CHARS, of every kind the tail splits."""
    return {
        "fence": "```python\n" + "".join(f"value_{i} = {i}  # a comment\n" for i in range(600)),
        "paragraph": "".join(f"line {i} of one paragraph that goes on\n" for i in range(600)),
        "one-line paragraph": " ".join(f"word{i}" for i in range(4000)),
        "bullet list": "".join(f"- item {i} of a long list\n" for i in range(600)),
        "ordered list": "".join(f"{i}. item {i} of a numbered list\n" for i in range(1, 601)),
        "quote": "".join(f"> quoted line {i} of a long quote\n" for i in range(600)),
    }


@pytest.mark.parametrize("kind", list(one_block_kinds()))
def test_a_single_huge_block_keeps_the_tail_bounded_and_drops_nothing(kind):
    text = one_block_kinds()[kind]
    step = 97
    pieces, tail, longest = feed(text, step)
    longest_line = max(len(line) for line in text.split("\n"))
    assert longest <= OPEN_CHARS + step + longest_line
    assert len(pieces) >= len(text) // (OPEN_CHARS + step + longest_line)
    assert not any(p.gap for p in pieces)  # the parts of one block follow each other with no blank line


def test_a_split_code_fence_is_drawn_as_code_in_every_part():
    text = one_block_kinds()["fence"]
    pieces, tail, _ = feed(text, 97)
    parser = MarkdownIt("gfm-like")
    code = []
    for shown in [p.shown for p in pieces] + [tail.shown]:
        blocks = [t for t in parser.parse(shown) if t.level == 0 and t.map is not None]
        assert [(t.type, t.info) for t in blocks] == [("fence", "python")]
        code.append(blocks[0].content)
    assert "".join(code) == text.split("\n", 1)[1]  # every code line once, in order


def test_a_split_numbered_list_keeps_counting():
    pieces, tail, _ = feed(one_block_kinds()["ordered list"], 97)
    parser = MarkdownIt("gfm-like")
    expected = 1
    for shown in [p.shown for p in pieces] + [tail.shown]:
        tokens = parser.parse(shown)
        assert tokens[0].type == "ordered_list_open" and int(tokens[0].attrs.get("start", 1)) == expected
        expected += sum(t.type == "list_item_open" and t.level == 1 for t in tokens)
    assert expected == 601


def test_finished_blocks_leave_the_tail_whole_and_drawn_as_written():
    text = reply_text(60)
    pieces, tail, longest = feed(text, 211)
    assert all(p.gap and p.shown == p.source for p in pieces)  # no block of this text needs a split
    assert longest < 211 + max(len(b) for b in text.split("\n\n")) + 2


def test_the_shared_parser_draws_as_rich_does():
    console = Console(width=60, file=open("/dev/null", "w"), color_system="truecolor")
    text = reply_text(12) + "\n\n| a | b |\n|---|---|\n| 1 | ~~2~~ |\n"
    assert console.render_lines(StreamMarkdown(text)) == console.render_lines(RichMarkdown(text, hyperlinks=False))


async def streamed(view: MessageView, message: Message, text: str, step: int):
    """Write `text` into the streaming `view` `step` characters at a time, the message's content first, as the
    generation worker does; yields after each write."""
    for start in range(0, len(text), step):
        message.content += text[start:start + step]
        await view.write(text[start:start + step])
        yield


class Host(App):
    def __init__(self, message: Message) -> None:
        super().__init__()
        self.message = message

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield MessageView(self.message, live=True)


@pytest.mark.asyncio
async def test_a_long_streamed_reply_is_one_widget_drawn_as_its_pieces_and_drops_nothing():
    text = reply_text(180)  # ~500 widgets once rendered in full as Markdown
    message = Message(id="r1", parent_id=None, role="assistant", content="", created_at=0.0, status="streaming")
    app = Host(message)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.query_one(MessageView)
        await pilot.pause()
        step, most_widgets, longest_tail = 700, 0, 0
        async for _ in streamed(view, message, text, step):
            body = view.query_one(StreamingBody)
            most_widgets = max(most_widgets, len(view.query("*")))
            longest_tail = max(longest_tail, len(body.tail))
            # Everything written is on screen, once: the frozen pieces, then the tail.
            assert body.text == message.content
            assert view.shown_chars == len(message.content)
            await pilot.pause()
        # Bounded by the open block, not by the reply; the whole reply rendered as Markdown is ~1,000 widgets.
        assert longest_tail < step + max(len(b) for b in text.split("\n\n")) + 2
        assert most_widgets <= 6
        # The body's lines are its pieces, each drawn as Rich draws that Markdown alone, with a blank line between
        # two where Rich draws one between their blocks (none between the parts of a split block).
        width = body.size.width
        expected = []
        for i, piece in enumerate(body.pieces):
            expected += [""] if i and _blank_between(body.pieces[i - 1], piece.ends and piece.ends[0]) else []
            expected += rich_lines(app, piece.shown, width)
        drawn = [body.render_line(y).text.rstrip() for y in range(len(expected))]
        assert drawn == expected
        assert "Part 0" in drawn[0]
        # A narrower view draws every piece again at its width.
        lines_before = body.get_content_height(body.size, body.size, width)
        await pilot.resize_terminal(60, 30)
        await pilot.pause()
        assert body.size.width < width
        assert body.get_content_height(body.size, body.size, body.size.width) > lines_before
        assert all(body.render_line(y).cell_length <= body.size.width for y in range(40))

        message.status = "ok"
        await view.finish()
        await pilot.pause()
        body = view.body
        assert view.query(StreamingBody).nodes == [body] and body.source == text and body.display
        assert len(view.query("*")) <= most_widgets  # no widget a block, unlike Textual's Markdown widget
        # The finished body is the whole text drawn as Rich draws it, once, then the gap to what follows.
        width = body.size.width
        expected = rich_lines(app, text, width) + [""]
        assert body.get_content_height(body.size, body.size, width) == len(expected)
        assert [body.render_line(y).text.rstrip() for y in range(len(expected))] == expected

        # The same reply opened finished (not streamed) draws the same lines.
        again = MessageView(Message(id="r2", parent_id=None, role="assistant", content=text, created_at=1.0))
        await app.query_one(VerticalScroll).mount(again)
        await pilot.pause()
        assert again.body.size.width == width
        assert [again.body.render_line(y).text for y in range(len(expected))] == \
            [body.render_line(y).text for y in range(len(expected))]


@pytest.mark.asyncio
async def test_a_reply_s_text_can_be_selected_with_the_mouse():
    """A reply body is one widget of drawn lines (not Textual's Markdown widget), so it carries what Textual's
    text selection needs itself: each line's cells know their offset, the selected span is drawn in the selection
    style, and the selection's text is the text as drawn."""
    from textual.geometry import Offset
    from textual.selection import Selection

    text = "First paragraph here.\n\nSecond one, a bit longer than the first."
    app = Host(Message(id="r1", parent_id=None, role="assistant", content=text, created_at=0.0))
    async with app.run_test(size=(80, 20)) as pilot:
        body = app.query_one(MessageView).body
        body.update(text)  # (the Host's view is a live one: it starts empty)
        await pilot.pause()
        line = body.render_line(2)
        assert line.text.startswith("Second one")
        offsets = [seg.style.meta.get("offset") for seg in line if seg.style is not None and seg.style.meta]
        assert offsets and offsets[0] == (0, 2)
        assert body.get_selection(Selection(Offset(6, 0), Offset(10, 2)))[0] == "paragraph here.\n\nSecond one"
        app.screen.selections = {body: Selection(Offset(0, 2), Offset(6, 2))}
        await pilot.pause()
        selected = body.render_line(2)
        style = app.screen.get_component_rich_style("screen--selection")
        marked = [seg.text for seg in selected if seg.style and style.bgcolor == seg.style.bgcolor]
        assert marked and marked[0].startswith("Second")


def mixed_text() -> str:
    """Every kind of short top-level block after every other (rules, tables, numbered lists, headings, quotes,
    paragraphs), then blocks long enough to be split while streaming (a paragraph, a code fence, a list), each
    after and before several kinds."""
    short = ["---", "| a | b |\n|---|---|\n| 1 | 2 |", "3. three\n4. four", "# Title", "> quoted\n> more",
             "plain words " * 8]
    long = ["```\n" + "\n".join(f"line {i} " + "x" * 40 for i in range(36)) + "\n```",
            " ".join(f"long{i}" for i in range(260)),
            "\n".join(f"- entry {i} " + "y" * 30 for i in range(40))]
    blocks = [block for a in short for b in short for block in (a, b)]
    blocks += [block for b in long for a in short[::2] for block in (a, b)] + short
    return "\n\n".join(blocks)


def rich_lines(app, text: str, width: int) -> list[str]:
    """`text` rendered whole by Rich's Markdown at `width`: the lines' text, trailing spaces dropped."""
    lines = app.console.render_lines(RichMarkdown(text, hyperlinks=False), app.console.options.update_width(width))
    return ["".join(seg.text for seg in line).rstrip() for line in lines]


@pytest.mark.asyncio
@pytest.mark.parametrize("trimmed", [False, True])
async def test_the_end_of_a_stream_draws_as_a_full_render_and_renders_only_its_split_blocks_and_tail(monkeypatch,
                                                                                                  trimmed):
    text = mixed_text()
    message = Message(id="r1", parent_id=None, role="assistant", content="", created_at=0.0, status="streaming")
    app = Host(message)
    async with app.run_test(size=(90, 30)) as pilot:
        view = app.query_one(MessageView)
        await pilot.pause()
        async for _ in streamed(view, message, text, 40):
            pass
        await pilot.pause()
        body = view.body
        pieces = body.pieces
        assert any(not p.gap for p in pieces)  # some blocks were split
        # The whole blocks frozen while streaming (not the piece that closed a split one) keep their lines.
        whole = [p for i, p in enumerate(pieces) if p.gap and (i == 0 or pieces[i - 1].gap)]
        kept = sum(len(p.source) for p in whole)
        assert len(whole) >= 20
        rendered = []
        draw = StreamingBody._markdown_lines
        monkeypatch.setattr(StreamingBody, "_markdown_lines",
                            lambda self, t, width: (rendered.append(t), draw(self, t, width))[1])
        if trimmed:  # the stored reply differs from what streamed (a stop string cut off): drawn in full
            message.content = text[:-40]
        message.status = "ok"
        await view.finish()
        drawn = sum(map(len, rendered))  # what the end rendered (a later paint at another width renders it all)
        await pilot.pause()
        final = message.content
        width = body.size.width
        expected = rich_lines(app, final, width) + [""]
        assert body.source == final
        assert body.get_content_height(body.size, body.size, width) == len(expected)
        assert [body.render_line(y).text.rstrip() for y in range(len(expected))] == expected
        if trimmed:
            assert sum(map(len, rendered)) >= len(final)
        else:  # the split blocks and the tail, each whole, are all the end renders
            assert drawn == len(final) - kept
        # At another width every piece is drawn again, still as a full render draws the text.
        await pilot.resize_terminal(60, 30)
        await pilot.pause()
        width = body.size.width
        expected = rich_lines(app, final, width) + [""]
        assert [body.render_line(y).text.rstrip() for y in range(len(expected))] == expected


@pytest.mark.asyncio
async def test_while_streaming_the_blank_lines_between_blocks_are_those_of_a_full_render():
    """Every kind of short block after every other, streamed a few characters at a time: after each write the body
    draws the text so far as Rich draws it whole (a list, quote or table brings its own blank line, a rule leaves
    none), so nothing moves when the reply ends."""
    short = ["---", "| a | b |\n|---|---|\n| 1 | 2 |", "3. three\n4. four", "# Title", "> quoted\n> more",
             "- dash\n- more", "plain words " * 3]
    text = "\n\n".join(block for a in short for b in short for block in (a, b))
    message = Message(id="r1", parent_id=None, role="assistant", content="", created_at=0.0, status="streaming")
    app = Host(message)
    async with app.run_test(size=(70, 30)) as pilot:
        view = app.query_one(MessageView)
        await pilot.pause()
        async for _ in streamed(view, message, text, 9):
            await pilot.pause()
            body = view.body
            width = body.size.width
            expected = rich_lines(app, message.content, width) + [""]
            drawn = [body.render_line(y).text.rstrip() for y in range(body.get_content_height(body.size, body.size, width))]
            assert drawn == expected, f"after {len(message.content)} characters"
        assert len(body.pieces) > 40


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["finish", "unmount"])
async def test_a_streaming_reply_keeps_its_drawn_lines_out_of_the_collector_s_passes_until_it_ends(end):
    """While a reply streams, what is alive as its blocks freeze (their drawn lines among it) is frozen out of the
    cyclic collector's passes (gc.freeze), which otherwise walked every line of a long reply again and again; the
    end of the stream, or the view's removal mid-stream, gives it all back."""
    import gc

    text = reply_text(40)
    message = Message(id="r1", parent_id=None, role="assistant", content="", created_at=0.0, status="streaming")
    app = Host(message)
    assert gc.get_freeze_count() == 0
    async with app.run_test(size=(90, 30)) as pilot:
        view = app.query_one(MessageView)
        await pilot.pause()
        async for _ in streamed(view, message, text, 300):
            await pilot.pause()
        frozen = gc.get_freeze_count()
        strip = view.body._lines[0]
        assert frozen > 0 and not any(o is strip for o in gc.get_objects())  # frozen objects are not tracked
        if end == "finish":
            message.status = "ok"
            await view.finish()
        else:
            await view.remove()
        await pilot.pause()
        assert gc.get_freeze_count() == 0

"""The saved chats: a search box (title and content) over a list, newest first."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option, OptionDoesNotExist

from ...textsafe import displayable, plain
from ..keys import bindings


def age(ts: float, now: float) -> str:
    """A short age such as '5m', '3h', '2d'."""
    s = max(0, now - ts)
    for size, unit in ((86400 * 7, "w"), (86400, "d"), (3600, "h"), (60, "m")):
        if s >= size:
            return f"{int(s // size)}{unit}"
    return "now"


#: Cells of one label line: the list's width (28) less its border and the options' padding.
LABEL_CELLS = 25


def clip(text: str, width: int) -> str:
    """One line of at most `width` cells (OptionList wraps long prompts, which hides the next row)."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


class ChatOptions(OptionList):
    """The list itself; its delete key asks the ChatList to delete the highlighted chat."""

    BINDINGS = bindings("chats")

    class DeleteHighlighted(Message):
        """The delete key was pressed on the list."""

    def action_delete_chat(self) -> None:
        self.post_message(self.DeleteHighlighted())

    def on_focus(self) -> None:
        # The cursor row starts on the open chat (else the first), so the first Down moves from there.
        if self.highlighted is None and self.option_count:
            self.highlighted = 0
        if self.highlighted is not None:
            self.scroll_to_highlight()


class ChatList(Vertical):
    """Lists `store.list_chats(query)`; posts `ChatList.Selected` and `ChatList.DeleteRequested`."""

    DEFAULT_CSS = """
    ChatList { width: 28; height: 1fr; border-right: vkey $panel; }
    ChatList Input { margin: 0 0 0 0; }
    ChatList OptionList { height: 1fr; border: none; background: transparent; }
    ChatList .none { color: $text-muted; padding: 1 1; height: auto; }
    """
    #: Marks the chat shown in the conversation.
    OPEN_MARK = "● "

    @dataclass
    class Selected(Message):
        chat_list: "ChatList"
        chat_id: str

    @dataclass
    class DeleteRequested(Message):
        chat_list: "ChatList"
        chat_id: str
        title: str

    def __init__(self, search: Callable[[str | None], list[Any]], clock: Callable[[], float] = time.time,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self._search = search
        self._clock = clock
        self.current: str | None = None
        """Id of the chat shown in the conversation, marked and highlighted here."""
        self._titles: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search chats", id="chat-search", compact=True)
        yield Static("", classes="none")
        yield ChatOptions(id="chat-options")

    @property
    def options(self) -> OptionList:
        return self.query_one(ChatOptions)

    @property
    def query_text(self) -> str:
        return self.query_one(Input).value.strip()

    def reload(self) -> None:
        """Re-read the list from the store (after a save, rename, delete or search)."""
        rows = self._search(self.query_text or None)
        now = self._clock()
        options = self.options
        options.clear_options()
        self._titles = {row.id: row.title or "Untitled" for row in rows}
        for row in rows:
            is_open = row.id == self.current
            title = clip(displayable(row.title or "Untitled"), LABEL_CELLS - len(self.OPEN_MARK))
            label = Text(self.OPEN_MARK if is_open else "  ", style="bold")
            label.append(title, style="bold" if is_open else "")
            # Age and count first: clipping then cuts the model name, never "3 msgs" into "3 m…".
            count = f"{row.message_count} msg{'s' if row.message_count != 1 else ''}"
            detail = " · ".join(p for p in (age(row.updated_at, now), count, row.model_id or "") if p)
            label.append("\n  " + clip(displayable(row.snippet or detail), LABEL_CELLS - 2), style="italic")
            options.add_option(Option(label, id=row.id))
        none = self.query_one(".none", Static)
        none.display = not rows
        if not rows:
            q = self.query_text
            none.update(plain(f"No chat matches “{q}”. Esc goes back." if q else
                              "No saved chats yet: a chat is saved with its first message."))
        if self.current is not None:
            try:
                options.highlighted = options.get_option_index(self.current)
            except OptionDoesNotExist:  # the current chat is filtered out by the search
                options.highlighted = None

    def focus_search(self) -> None:
        self.query_one(Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.reload()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(self.Selected(self, event.option.id))

    def on_chat_options_delete_highlighted(self, event: ChatOptions.DeleteHighlighted) -> None:
        event.stop()
        options = self.options
        if options.highlighted is not None:
            option = options.get_option_at_index(options.highlighted)
            if option.id:
                self.post_message(self.DeleteRequested(self, option.id, self._titles.get(option.id, "this chat")))


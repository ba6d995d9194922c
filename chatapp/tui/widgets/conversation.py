"""The message list: the current branch (root to leaf) as MessageViews in an anchored scroll view,
with exactly one selected message.

The selection lives here and nowhere else. It is always a message on screen (the last one unless
the user or an operation picked another), always drawn (a mark and a background, stronger while the
list has focus), and every message key, screen key and mouse click acts on it: the list posts
`ActionRequested` with the selected id, and whoever carries out the action says which message to
select afterwards (`show(..., select=)`), so the highlight and the next key never disagree.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Static

from ...textsafe import plain
from ..keys import bindings
from .message import MessageView


class ConversationView(VerticalScroll, can_focus=True):
    """Messages of the current branch; follows the bottom while streaming unless scrolled up."""

    DEFAULT_CSS = """
    ConversationView { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    ConversationView > .system { color: $text-muted; text-style: italic; margin: 0 0 1 0; }
    ConversationView > .empty { color: $text-muted; width: 100%; content-align: center middle; height: 1fr; }
    """

    BINDINGS = bindings("messages")

    @dataclass
    class ActionRequested(Message):
        """A message key was pressed: `action` on message `message_id`, optional `delta`."""

        view: "ConversationView"
        action: str
        message_id: str
        delta: int = 0

    @dataclass
    class SelectionChanged(Message):
        """The selected message changed (None: the chat is empty)."""

        view: "ConversationView"
        message_id: str | None

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.conv = None
        """The chat-layer Conversation shown, or None."""
        self._order: list[str] = []
        # Message id -> its view. A CSS query would walk every Markdown block of the chat on each
        # streamed batch.
        self._views: dict[str, MessageView] = {}
        self._selected: str | None = None
        # One rebuild at a time: two interleaved (a chat opened while the screen still mounts) would
        # leave views of one with the ids of the other.
        self._building = asyncio.Lock()

    def on_mount(self) -> None:
        self.anchor()

    # Building.
    async def show(self, conv, empty_text: str = "", system: str = "", select: str | None = None) -> None:
        """Render the current branch of `conv` from scratch, the `system` line above it, and select
        `select` (else the message selected before, if still shown, else the last)."""
        async with self._building:
            await self._show(conv, empty_text, system, select)

    async def _show(self, conv, empty_text: str, system: str, select: str | None) -> None:
        self.conv = conv
        keep = select or self._selected
        await self.remove_children()
        self._order, self._views = [], {}
        views: list = [Static(plain(system), classes="system")] if system else []
        if conv is None or not conv.messages:
            views.append(Static(plain(empty_text), classes="empty"))
        else:
            for m in conv.path():
                views.append(MessageView(m, conv.sibling_index(m.id)))
                self._views[m.id] = views[-1]
                self._order.append(m.id)
        await self.mount_all(views)
        self._selected = None
        self.select(keep if keep in self._views else (self._order[-1] if self._order else None))
        self.anchor()

    async def set_system(self, system: str) -> None:
        """Replace the system line above the messages in place (a model loaded, its default changed), leaving
        every message view, a streaming one included, as it is."""
        async with self._building:
            old = [c for c in self.children if c.has_class("system")]
            if system and old:
                old[0].update(plain(system))
            elif system:
                line = Static(plain(system), classes="system")
                await (self.mount(line, before=0) if self.children else self.mount(line))
            else:
                for w in old:
                    await w.remove()

    async def add_message(self, message, live: bool = False, select: bool | None = None) -> MessageView:
        """Append a message view: a sent prompt, or (live) the reply that starts streaming, whose
        text then arrives only through `MessageView.write`. `select` True selects it; None lets a
        selection on the last message follow to it while the user is not in the list (as a cursor
        at the end of a text does), and stay where the user put it while they are."""
        async with self._building:
            for empty in self.query(".empty"):
                await empty.remove()
        at_end = self._selected is None or (bool(self._order) and self._selected == self._order[-1])
        follow = select if select is not None else at_end and not self.has_focus
        view = MessageView(message, self.conv.sibling_index(message.id) if self.conv else (0, 1), live=live)
        await self.mount(view)
        self._order.append(message.id)
        self._views[message.id] = view
        if follow:
            self.select(message.id, scroll=False)
        return view

    def view_for(self, message_id: str) -> MessageView | None:
        return self._views.get(message_id)

    def refresh_branch_marks(self) -> None:
        """Update sibling counts after a branch was added or removed."""
        if self.conv is None:
            return
        for view in self._views.values():
            if view.message.id in self.conv.messages:
                view.refresh_message(self.conv.sibling_index(view.message.id))

    # Selection.
    @property
    def selected(self) -> str | None:
        """The message every message action applies to (None only when the chat is empty)."""
        return self._selected

    def select(self, message_id: str | None, scroll: bool = True) -> None:
        if message_id is not None and message_id not in self._views:
            return
        if message_id != self._selected:
            old = self._views.get(self._selected) if self._selected else None
            if old is not None:
                old.set_selected(False)
            self._selected = message_id
            if message_id is not None:
                self._views[message_id].set_selected(True)
            self.post_message(self.SelectionChanged(self, message_id))
        view = self._views.get(message_id) if message_id else None
        if scroll and view is not None and message_id != (self._order[-1] if self._order else None):
            # Off the end: stop following the bottom so the selected message stays in sight.
            self.release_anchor()
            self.call_after_refresh(self.scroll_to_widget, view, animate=False)

    def on_message_view_clicked(self, event: MessageView.Clicked) -> None:
        event.stop()
        self.select(event.message_id)
        self.focus()

    def action_move(self, delta: int) -> None:
        if not self._order:
            return
        current = self._order.index(self._selected) if self._selected in self._order else len(self._order) - 1
        self.select(self._order[max(0, min(len(self._order) - 1, current + delta))])

    def action_leave(self) -> None:
        self.screen.focus_next("Composer")

    def request(self, action: str, delta: int = 0) -> None:
        """Ask for `action` on the selected message (screen keys such as Ctrl+R come here too)."""
        if self._selected is not None:
            self.post_message(self.ActionRequested(self, action, self._selected, delta))

    def action_edit(self) -> None:
        self.request("edit")

    def action_regenerate(self) -> None:
        self.request("regenerate")

    def action_continue(self) -> None:
        self.request("continue")

    def action_delete(self) -> None:
        self.request("delete")

    def action_sibling(self, delta: int) -> None:
        self.request("sibling", delta)

    def action_fork(self) -> None:
        self.request("fork")

    def action_copy(self) -> None:
        self.request("copy")

    def action_inspect(self) -> None:
        self.request("inspect")

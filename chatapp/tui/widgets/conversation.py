"""The conversation: the current branch (root to leaf) as MessageViews in an anchored scroll view.

It owns the selection (which message the message keys act on) and the live reply's view; tree
operations (edit, regenerate, delete, branch switch, fork) are posted up as `ActionRequested` for
the screen to carry out on the chat layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

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

    selected: reactive[str | None] = reactive(None)
    """Id of the message the message keys act on; None means the last one."""

    @dataclass
    class ActionRequested(Message):
        """A message key was pressed: `action` on message `message_id`, optional `delta`."""

        view: "ConversationView"
        action: str
        message_id: str
        delta: int = 0

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.conv = None
        """The chat-layer Conversation shown, or None."""
        self._order: list[str] = []
        # Message id -> its view. A CSS query would walk every Markdown block of the chat on each
        # streamed batch.
        self._views: dict[str, MessageView] = {}

    def on_mount(self) -> None:
        self.anchor()

    # Building.
    async def show(self, conv, empty_text: str = "") -> None:
        """Render the current branch of `conv` from scratch."""
        self.conv = conv
        await self.remove_children()
        self._order, self._views = [], {}
        if conv is None or not conv.messages:
            await self.mount(Static(empty_text, classes="empty", markup=False))
            return
        views = []
        if conv.system_prompt:
            views.append(Static(f"System: {conv.system_prompt}", classes="system", markup=False))
        for m in conv.path():
            views.append(MessageView(m, conv.sibling_index(m.id)))
            self._views[m.id] = views[-1]
            self._order.append(m.id)
        await self.mount_all(views)
        if self.selected not in self._order:
            self.selected = None
        self._mark_selected()
        self.anchor()

    async def add_message(self, message, live: bool = False) -> MessageView:
        """Append a message view: a sent prompt, or (live) the reply that starts streaming, whose
        text then arrives only through `MessageView.write`."""
        for empty in self.query(".empty"):
            await empty.remove()
        view = MessageView(message, self.conv.sibling_index(message.id) if self.conv else (0, 1), live=live)
        await self.mount(view)
        self._order.append(message.id)
        self._views[message.id] = view
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
    def target_id(self) -> str | None:
        """The message keys act on: the selection, else the last message."""
        return self.selected if self.selected in self._order else (self._order[-1] if self._order else None)

    def watch_selected(self) -> None:
        self._mark_selected()

    def on_focus(self) -> None:
        self._mark_selected()

    def on_blur(self) -> None:
        self._mark_selected()

    def _mark_selected(self) -> None:
        target = self.target_id if self.has_focus else None
        for view in self._views.values():
            view.set_class(view.message.id == target, "-selected")

    def action_move(self, delta: int) -> None:
        if not self._order:
            return
        current = self._order.index(self.target_id) if self.target_id in self._order else len(self._order) - 1
        index = max(0, min(len(self._order) - 1, current + delta))
        self.selected = self._order[index]
        view = self.view_for(self.selected)
        if view is not None:
            self.release_anchor()
            self.scroll_to_widget(view, animate=False)

    def action_leave(self) -> None:
        self.selected = None
        self.screen.focus_next("Composer")

    def _request(self, action: str, delta: int = 0) -> None:
        if self.target_id is not None:
            self.post_message(self.ActionRequested(self, action, self.target_id, delta))

    def action_edit(self) -> None:
        self._request("edit")

    def action_regenerate(self) -> None:
        self._request("regenerate")

    def action_continue(self) -> None:
        self._request("continue")

    def action_delete(self) -> None:
        self._request("delete")

    def action_sibling(self, delta: int) -> None:
        self._request("sibling", delta)

    def action_fork(self) -> None:
        self._request("fork")

    def action_copy(self) -> None:
        self._request("copy")

"""The chat screen's columns: the chat list and the side panels show while the conversation keeps a
readable measure; below that width the one asked for last stays (Ctrl+B, Ctrl+T toggle them)."""
from __future__ import annotations

from textual.events import Resize

from ..widgets.chat_list import ChatList

#: Widths of the chat list and the side panels, and the narrowest the conversation may get:
#: below list + side + MIN_CHAT columns only one panel shows, below panel + MIN_CHAT none.
LIST_W, SIDE_W, MIN_CHAT = 28, 38, 42


class PanelLayout:
    """Mixed into ChatScreen (a Screen with a ChatList and a #side column)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._want = {"chats": True, "side": True}
        self._last_toggled = "chats"

    def on_resize(self, event: Resize) -> None:
        self._layout()

    def _layout(self) -> None:
        width = self.size.width
        show = dict(self._want)
        if show["chats"] and show["side"] and width - LIST_W - SIDE_W < MIN_CHAT:
            show["side" if self._last_toggled == "chats" else "chats"] = False  # room for one: the last asked
        show["side"] = show["side"] and width - SIDE_W >= MIN_CHAT
        show["chats"] = show["chats"] and width - LIST_W >= MIN_CHAT
        self.query_one(ChatList).display = show["chats"]
        self.query_one("#side").display = show["side"]

    def _toggle(self, name: str, widget) -> None:
        self._want[name] = not widget.display
        self._last_toggled = name
        self._layout()
        if self._want[name] and not widget.display:
            self.notify("The terminal is too narrow for this panel beside the chat.", severity="warning")

    def action_toggle_chats(self) -> None:
        self._toggle("chats", self.query_one(ChatList))

    def action_toggle_panels(self) -> None:
        self._toggle("side", self.query_one("#side"))

"""Chat-level commands on the chat on screen: rename, delete, export, import and its settings.

Each asks through a dialog, changes the store, and then has ChatActions (which owns the open chat)
show the result; the chat list follows through `ChatActions.Changed`.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from textual.widget import Widget

from ...chat.store import StoreError
from .chat_actions import ChatActions


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file.
    The folder must exist: a mistyped path is an error, not a new directory tree."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "chat"


class ChatLibrary(Widget):
    """Not drawn itself."""

    DEFAULT_CSS = "ChatLibrary { display: none; }"

    def __init__(self, actions: ChatActions, **kw: Any) -> None:
        super().__init__(**kw)
        self.actions = actions

    @property
    def conv(self):
        return self.actions.conv

    def _saved(self) -> bool:
        if self.conv is None or not self.conv.messages:
            self.notify("This chat is empty: nothing is saved yet.", severity="warning")
            return False
        return True

    def _store(self, what: str, call, *args) -> bool:
        try:
            call(*args)
        except (StoreError, OSError) as e:
            self.notify(f"Could not {what}: {e}", severity="error")
            return False
        return True

    def rename(self) -> None:
        if not self._saved():
            return
        from ..screens.dialogs import TextPrompt

        def renamed(title: str | None) -> None:
            if title and self._store("rename the chat", self.app.store.rename, self.conv.id, title):
                self.conv.title = title
                self.actions.post_message(ChatActions.Changed(self.conv))

        self.app.push_screen(TextPrompt("Rename chat", self.conv.title), renamed)

    def delete(self, chat_id: str, title: str) -> None:
        """Ask, then delete the chat (every branch); a fresh chat replaces it if it was on screen."""
        from ..screens.dialogs import Confirm

        async def answered(yes: bool | None) -> None:
            if not yes or not self._store("delete the chat", self.app.store.delete, chat_id):
                return
            if self.conv is not None and self.conv.id == chat_id:
                await self.actions.new_chat()
            else:
                self.actions.post_message(ChatActions.Changed(self.conv))

        self.app.push_screen(Confirm(f"Delete “{title}”?", detail="Every branch of it is removed."), answered)

    def export(self) -> None:
        if not self._saved():
            return
        from ...chat.export import to_json, to_markdown
        from ..screens.dialogs import TextPrompt

        default = Path.home() / f"smollchat-{slug(self.conv.title)}.md"

        def chosen(path: str | None) -> None:
            if not path:
                return
            target = Path(path).expanduser()
            default_system = self.app.entry.chat.default_system if self.app.entry is not None else None
            text = (to_json(self.conv) if target.suffix.lower() == ".json"
                    else to_markdown(self.conv, default_system=default_system))
            try:
                write_atomic(target, text)
            except OSError as e:
                self.notify(f"Could not write {target}: {e.strerror or e}", severity="error")
                return
            self.notify(f"Exported to {target}.")

        self.app.push_screen(TextPrompt("Export chat to", str(default),
                                        hint=".md: this branch as Markdown with its settings; "
                                             ".json: the whole tree, re-importable"), chosen)

    def import_(self) -> None:
        from ...chat.export import from_json
        from ..screens.dialogs import TextPrompt

        async def chosen(path: str | None) -> None:
            if not path:
                return
            source = Path(path).expanduser()
            try:
                conv = from_json(source.read_text(encoding="utf-8"))
            except OSError as e:
                self.notify(f"Could not read {source}: {e.strerror or e}", severity="error")
                return
            except (ValueError, RecursionError) as e:
                self.notify(f"Could not import {source.name}: {e}", severity="error")
                return
            try:  # fresh ids and a distinct title when the chat was imported before
                conv = self.app.store.import_chat(conv)
            except (StoreError, OSError) as e:
                self.notify(f"Could not store the imported chat: {e}", severity="error")
                return
            await self.actions.open_chat(conv.id)
            self.notify(f"Imported “{conv.title}”.")

        self.app.push_screen(TextPrompt("Import a chat from a .json export", placeholder="~/chat.json"), chosen)

    def settings(self) -> None:
        from ..screens.settings import ChatSettings

        conv = self.conv
        defaults = self.app.entry.sampling() if self.app.entry is not None else None
        default_system = self.app.entry.chat.default_system if self.app.entry is not None else ""

        async def applied(result: dict | None) -> None:
            if result is None:
                return
            conv.system_prompt = result["system_prompt"]
            conv.settings = result["settings"]
            if conv.messages:
                self._store("save the settings", self.app.store.save, conv)
            await self.actions.show()

        self.app.push_screen(ChatSettings(conv, defaults, default_system, self.app.store), applied)

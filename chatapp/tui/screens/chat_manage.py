"""Chat-level actions of the chat screen: new, open, rename, delete, search, fork, export/import
and the per-chat settings dialog. A mixin so the streaming screen stays readable."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ...chat.conversation import Conversation
from ..widgets.chat_list import ChatList
from .dialogs import Confirm, TextPrompt

EMPTY = "Type a message below and press Enter.\nCtrl+O picks a model, F1 lists every key, Ctrl+P every command."


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
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


class ChatManagement:
    """Mixed into ChatScreen (which provides conv, view, start_reply, _busy, _header, _refresh_controls)."""

    async def open_new_chat(self, system_prompt: str | None = None) -> None:
        """An empty chat on the loaded model; stored once it gets its first message."""
        if self.streaming is not None:
            return
        self.conv = Conversation(model_id=self.app.entry_id, system_prompt=system_prompt)
        self.query_one(ChatList).current = None
        await self.view.show(self.conv, EMPTY)
        await self._refresh_controls()
        self._header()

    async def open_chat(self, chat_id: str) -> None:
        if self._busy():
            return
        try:
            self.conv = self.app.store.load(chat_id)
        except KeyError:
            self.notify("That chat no longer exists.", severity="warning")
            self.query_one(ChatList).reload()
            return
        chat_list = self.query_one(ChatList)
        chat_list.current = chat_id
        await self.view.show(self.conv, EMPTY)
        await self._refresh_controls()
        self._header()

    async def on_chat_list_selected(self, event: ChatList.Selected) -> None:
        await self.open_chat(event.chat_id)
        self.composer.focus()

    def on_chat_list_delete_requested(self, event: ChatList.DeleteRequested) -> None:
        self._confirm_delete(event.chat_id)

    async def action_new_chat(self) -> None:
        if not self._busy():
            await self.open_new_chat()
            self.composer.focus()

    def action_search_chats(self) -> None:
        chat_list = self.query_one(ChatList)
        chat_list.display = True
        chat_list.focus_search()

    def _saved(self) -> bool:
        if self.conv is None or not self.conv.messages:
            self.notify("This chat is empty: nothing is saved yet.", severity="warning")
            return False
        return True

    def action_rename_chat(self) -> None:
        if not self._saved():
            return

        def renamed(title: str | None) -> None:
            if title:
                self.app.store.rename(self.conv.id, title)
                self.conv.title = title
                self.query_one(ChatList).reload()
                self._header()

        self.app.push_screen(TextPrompt("Rename chat", self.conv.title), renamed)

    def action_delete_chat(self) -> None:
        if self._saved() and not self._busy():
            self._confirm_delete(self.conv.id)

    def _confirm_delete(self, chat_id: str) -> None:
        if self.streaming is not None and self.conv is not None and chat_id == self.conv.id:
            self._busy()
            return
        title = next((c.title for c in self.app.store.list_chats() if c.id == chat_id), "this chat")

        async def answered(yes: bool | None) -> None:
            if not yes:
                return
            self.app.store.delete(chat_id)
            self.query_one(ChatList).reload()
            if self.conv is not None and self.conv.id == chat_id:
                await self.open_new_chat()

        self.app.push_screen(Confirm(f"Delete “{title}”?", detail="Every branch of it is removed."), answered)

    async def fork_chat(self, message_id: str) -> None:
        """A new chat holding the branch from the first message to `message_id`."""
        if self.conv is None:
            return
        forked = self.conv.fork(message_id)
        self.app.store.save(forked)
        self.query_one(ChatList).reload()
        await self.open_chat(forked.id)
        self.notify(f"Forked into “{forked.title}”.")

    def action_export_chat(self) -> None:
        if not self._saved():
            return
        default = Path.home() / f"smollchat-{slug(self.conv.title)}.md"

        def chosen(path: str | None) -> None:
            if not path:
                return
            from ...chat.export import to_json, to_markdown

            target = Path(path).expanduser()
            text = to_json(self.conv) if target.suffix.lower() == ".json" else to_markdown(self.conv)
            try:
                write_atomic(target, text)
            except OSError as e:
                self.notify(f"Could not write {target}: {e.strerror or e}", severity="error")
                return
            self.notify(f"Exported to {target}.")

        self.app.push_screen(TextPrompt("Export chat to", str(default),
                                        hint=".md: this branch as Markdown with its settings; "
                                             ".json: the whole tree, re-importable"), chosen)

    def action_import_chat(self) -> None:
        async def chosen(path: str | None) -> None:
            if not path:
                return
            from ...chat.export import from_json

            source = Path(path).expanduser()
            try:
                conv = from_json(source.read_text(encoding="utf-8"))
            except OSError as e:
                self.notify(f"Could not read {source}: {e.strerror or e}", severity="error")
                return
            except ValueError as e:
                self.notify(f"Could not import {source.name}: {e}", severity="error")
                return
            if self.app.store.exists(conv.id):
                conv = conv.clone()
            self.app.store.save(conv)
            self.query_one(ChatList).reload()
            await self.open_chat(conv.id)
            self.notify(f"Imported “{conv.title}”.")

        self.app.push_screen(TextPrompt("Import a chat from a .json export", placeholder="~/chat.json"), chosen)

    def action_chat_settings(self) -> None:
        from .settings import ChatSettings

        if self.conv is None or self._busy():
            return
        defaults = self.app.entry.sampling() if self.app.entry is not None else None
        default_system = self.app.entry.chat.default_system if self.app.entry is not None else ""

        async def applied(result: dict | None) -> None:
            if result is None:
                return
            self.conv.system_prompt = result["system_prompt"]
            self.conv.settings = result["settings"]
            if self.conv.messages:
                self.app.store.save(self.conv)
            await self.view.show(self.conv, EMPTY)
            self._header()

        self.app.push_screen(ChatSettings(self.conv, defaults, default_system, self.app.store), applied)

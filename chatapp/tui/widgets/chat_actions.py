"""Chat actions: the chat on screen and everything done to its tree (send, reply, edit, regenerate,
continue, delete, switch branch, fork, copy, retry a failed send).

It owns the open `Conversation`; it draws through the message list it was given (awaited, so a
reply never starts streaming into a list that is still being rebuilt) and starts replies through
the LiveReply. Every action names the message it acts on, which is the list's one selection, and
says which message to select afterwards. It posts `Changed` when the header, the chat list or the
panels must follow.

A send that cannot run (the prompt does not fit the context, the store fails) leaves the prompt in
the tree, marked failed with the reason; `retry` (r on it, or sending the same text) reuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message
from textual.widget import Widget

from ...chat.conversation import Conversation
from ...chat.store import StoreError
from .conversation import ConversationView
from .live import LiveReply
from .message import failed_send

#: Share of the context (the prompt plus room for the reply) above which the composer warns.
CONTEXT_WARN = 0.85
EMPTY = "Type a message below and press Enter.\nCtrl+O picks a model, F1 lists every key, Ctrl+P every command."


class ChatActions(Widget):
    """Not drawn itself."""

    DEFAULT_CSS = "ChatActions { display: none; }"

    @dataclass
    class Changed(Message):
        """The chat on screen changed (another chat, a new message, a finished reply, settings)."""

        conv: Conversation | None
        switched: bool = False
        """Another chat (or a new one) replaced the one on screen: panels start over."""

    def __init__(self, view: ConversationView, live: LiveReply, **kw: Any) -> None:
        super().__init__(**kw)
        self.view, self.live = view, live
        self.conv: Conversation | None = None
        """The chat on screen (saved once it has a message)."""
        self._repairs_told: set[str] = set()

    # Helpers.
    def busy(self) -> bool:
        if self.live.busy:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return True
        return False

    def save(self) -> str | None:
        """Store the chat; the reason when the store refused (the chat stays on screen, unsaved)."""
        try:
            self.app.store.save(self.conv)
        except (StoreError, OSError) as e:
            return f"The chat could not be saved: {e}"
        return None

    def system_line(self) -> str:
        """What the model receives as its system prompt, always shown (None means its default)."""
        conv, entry = self.conv, self.app.entry
        if conv is not None and conv.system_prompt is not None:
            return f"System: {conv.system_prompt}" if conv.system_prompt else "System: (none)"
        default = entry.chat.default_system if entry is not None else None
        if default is None:
            return "System: the model's default (load a model to see it)"
        return f"System (the model's default): {default}" if default else "System: (none; the model has no default)"

    def context_note(self) -> str:
        """A warning once the next prompt nearly fills the model's context ("" while there is room)."""
        session, conv = self.app.session, self.conv
        if session is None or conv is None or not conv.current_leaf:
            return ""
        try:
            prompt = session.prompt(conv)
        except ValueError as e:  # ContextOverflow, or settings that no longer apply
            return str(e)
        limit = session.context_limit
        if prompt.dropped_turns:
            return f"context full: the {prompt.dropped_turns} oldest turn(s) are left out; Ctrl+N starts a new chat"
        if len(prompt.ids) + prompt.reserve >= CONTEXT_WARN * limit:
            return f"context nearly full: {len(prompt.ids):,} of {limit:,} tokens; older turns will soon be left out"
        return ""

    async def refresh_system_line(self) -> None:
        """The system line again (the loaded model's default may have changed), without rebuilding the chat."""
        await self.view.set_system(self.system_line())
        self.post_message(self.Changed(self.conv))

    async def show(self, select: str | None = None, switched: bool = False) -> None:
        await self.view.show(self.conv, EMPTY, self.system_line(), select)
        self.post_message(self.Changed(self.conv, switched))

    # Opening chats.
    async def new_chat(self, system_prompt: str | None = None) -> None:
        """An empty chat on the loaded model; stored once it gets its first message."""
        self.conv = Conversation(model_id=self.app.entry_id, system_prompt=system_prompt)
        await self.show(switched=True)

    async def open_chat(self, chat_id: str) -> bool:
        try:
            conv = self.app.store.load(chat_id)
        except KeyError:
            self.notify("That chat no longer exists.", severity="warning")
            return False
        except (StoreError, OSError) as e:
            self.notify(f"The chat could not be opened: {e}", severity="error")
            return False
        self.conv = conv
        await self.show(switched=True)
        if conv.repairs and conv.id not in self._repairs_told:  # once a run: the rows stay as stored until a save
            self._repairs_told.add(conv.id)
            more = f" (and {len(conv.repairs) - 3} more)" if len(conv.repairs) > 3 else ""
            self.notify("; ".join(conv.repairs[:3]) + more + ". The repaired chat is shown; it is stored that "
                        "way with your next change.", title="Some of this chat's stored rows were damaged", severity="warning",
                        timeout=20)
        return True

    # Sending and replies.
    async def send(self, text: str) -> None:
        conv = self.conv
        leaf = conv.get(conv.current_leaf) if conv.current_leaf else None
        if leaf is not None and failed_send(leaf):
            if leaf.content == text:
                await self.retry(leaf.id)
                return
            # A different text replaces the failed prompt as a sibling branch: never two prompts in a row.
            msg = conv.add(leaf.parent_id, "user", text)
            conv.model_id = self.app.entry_id
            await self._start_prompt(msg, rebuild=True)
            return
        msg = conv.add(conv.current_leaf, "user", text)
        conv.model_id = self.app.entry_id
        await self.view.add_message(msg)
        await self._start_prompt(msg)

    async def _start_prompt(self, msg, rebuild: bool = False) -> None:
        error = self.save()
        if error is not None:
            await self.fail(msg.id, error, rebuild=True)
            return
        if rebuild:
            await self.show(select=msg.id)
        self.post_message(self.Changed(self.conv))
        self.start(msg.id)

    def start(self, parent_id: str, continue_from: str | None = None, select: bool | None = None) -> None:
        self.live.start(self.app.session, self.conv, parent_id, continue_from, select)

    async def fail(self, message_id: str, reason: str, rebuild: bool = False) -> None:
        """Mark the prompt `message_id` as not sent, with the reason, and select it."""
        msg = self.conv.get(message_id)
        msg.status, msg.run = "error", {**msg.run, "error": reason}
        self.save()  # best effort: when the store is the problem the mark lives on screen only
        if rebuild or self.view.view_for(message_id) is None:
            await self.show(select=message_id)
        else:
            self.view.view_for(message_id).refresh_message()
            self.view.select(message_id)
        self.notify(reason, title="Not sent", severity="error")
        self.post_message(self.Changed(self.conv))

    async def retry(self, message_id: str) -> None:
        """Send the failed prompt again, in place."""
        msg = self.conv.get(message_id)
        msg.status = "ok"
        msg.run.pop("error", None)
        self.conv.current_leaf = msg.id
        await self._start_prompt(msg, rebuild=True)

    async def finished(self, event: LiveReply.Finished) -> None:
        conv = self.conv
        if conv is None or event.conv_id != conv.id:
            return
        msg = conv.messages.get(event.message_id) if event.message_id else None
        done = event.done
        if event.error and msg is None and event.parent_id in conv.messages:
            await self.fail(event.parent_id, event.error)
            return
        if done is not None and done.stop_reason == "context_full" and done.new_tokens == 0 and msg is not None:
            # The engine refused the prompt: an empty reply would hide that the prompt never ran.
            conv.delete(msg.id)
            await self.fail(msg.parent_id, done.detail or "The prompt fills the model's context.", rebuild=True)
            return
        if event.error:
            if msg is not None:
                msg.status = "error"
                msg.run["error"] = event.error
                view = self.view.view_for(msg.id)
                if view is not None:
                    view.refresh_message()
            self.notify(event.error, title="Generation failed", severity="error")
        error = self.save()
        if error:
            self.notify(error, severity="error")
        self.view.refresh_branch_marks()
        self.post_message(self.Changed(conv))

    # Tree actions on the selected message.
    async def act(self, action: str, message_id: str, delta: int = 0) -> None:
        conv = self.conv
        if conv is None or message_id not in conv.messages or self.busy():
            return
        msg = conv.get(message_id)
        if action == "copy":
            self.app.copy_to_clipboard(msg.content)
            self.notify("Message copied to the clipboard.")
        elif action == "edit":
            from ..screens.dialogs import EditMessage

            self.app.push_screen(EditMessage(msg.role, msg.content), lambda text: self._edited(msg.id, text))
        elif action == "regenerate":
            await self.regenerate(msg.id)
        elif action == "continue":
            await self.continue_reply(msg.id)
        elif action == "delete":
            self.delete_message(msg.id)
        elif action == "fork":
            await self.fork_chat(msg.id)
        elif action == "sibling":
            self.notify("This message has no other branch." if conv.sibling_index(msg.id)[1] < 2
                        else "No further branch that way.", severity="information", timeout=2)

    async def branch_switched(self, message_id: str) -> None:
        self.save()
        await self.show(select=message_id)

    async def _edited(self, message_id: str, text: str | None) -> None:
        if text is None or self.conv is None:
            return
        new = self.conv.edit(message_id, text)
        if new.role == "user" and self.app.session is not None:
            await self._start_prompt(new, rebuild=True)
            return
        self.save()
        await self.show(select=new.id)

    def delete_message(self, message_id: str) -> None:
        """Delete at once when nothing hangs below the message; ask when replies would go with it."""
        n = len(self.conv.subtree(message_id))
        if n == 1:
            self.call_later(self._delete_message, message_id)
            return
        from ..screens.dialogs import Confirm

        self.app.push_screen(Confirm("Delete this message?", detail=f"and the {n - 1} message(s) after it on "
                                     "every branch"), lambda yes: self._delete_message(message_id) if yes else None)

    async def _delete_message(self, message_id: str) -> None:
        self.conv.delete(message_id)
        self.save()
        await self.show(select=self.conv.current_leaf)  # the neighbouring branch's end, else the parent

    async def regenerate(self, message_id: str) -> None:
        """A new reply beside the selected one (or for the selected prompt); the old one stays."""
        conv = self.conv
        if self.app.session is None:
            self.notify("Load a model first: Ctrl+O opens the models screen.", severity="warning")
            return
        target = conv.get(message_id)
        if failed_send(target):
            await self.retry(target.id)
            return
        parent = target.parent_id if target.role == "assistant" else target.id
        if parent is None:
            return
        conv.current_leaf = parent
        await self.show(select=parent)
        self.start(parent, select=True)  # the new reply is what the user asked for: it takes the selection

    async def continue_reply(self, message_id: str) -> None:
        msg = self.conv.get(message_id)
        if msg.role != "assistant" or self.app.session is None:
            self.notify("Continue works on a model reply.", severity="warning")
            return
        if self.conv.children(msg.id):
            self.notify("Continue works on the last reply of a branch.", severity="warning")
            return
        self.conv.current_leaf = msg.id
        await self.show(select=msg.id)
        self.start(msg.parent_id, continue_from=msg.id, select=True)

    async def fork_chat(self, message_id: str) -> None:
        """A new chat holding the branch from the first message to `message_id`."""
        forked = self.conv.fork(message_id)
        try:
            self.app.store.save(forked)
        except (StoreError, OSError) as e:
            self.notify(f"The fork could not be saved: {e}", severity="error")
            return
        if await self.open_chat(forked.id):
            self.notify(f"Forked into “{forked.title}”.")

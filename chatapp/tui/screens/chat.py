"""The chat screen: chat list | conversation + composer | model, memory and compute panels.

It routes: the composer and the message list post requests, this screen applies them to the
chat layer (Conversation tree, Session, Store) and starts the one generation worker, which streams
in a thread and posts batched messages back (see streaming.pump).
"""
from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, get_current_worker

from ...chat.conversation import Conversation
from ..keys import bindings
from ..messages import ReplyFinished
from ..streaming import pump
from ..widgets.chat_list import ChatList
from ..widgets.composer import Composer
from ..widgets.compute import ComputePanel
from ..widgets.conversation import ConversationView
from ..widgets.memory import MemoryPanel
from ..widgets.model_info import ModelInfo
from .chat_manage import EMPTY, ChatManagement
from .live import LiveReply
from .dialogs import Confirm, EditMessage



class ChatScreen(LiveReply, ChatManagement, Screen):
    CSS_PATH = "chat.tcss"
    BINDINGS = bindings("chat")

    def __init__(self) -> None:
        super().__init__()
        self.conv: Conversation | None = None
        """The chat on screen (saved once it has a message)."""
        self.streaming: str | None = None
        """Id of the reply being generated (its message id once known, "" before), None when idle."""
        self._worker: Worker | None = None
        self.init_live()

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            yield ChatList(self.app.store.list_chats, clock=self.app.clock, id="chat-list")
            with Vertical(id="main"):
                yield Static("", id="chat-header", markup=False)
                yield ConversationView(id="conversation")
                yield Composer(self.app.store.recent_prompts(), id="composer",
                               placeholder="Message (Enter sends, Shift+Enter new line)")
            with VerticalScroll(id="side"):
                yield ModelInfo(id="model-info")
                yield MemoryPanel(id="memory")
                yield ComputePanel(id="compute")
        yield Footer()

    @property
    def view(self) -> ConversationView:
        return self.query_one(ConversationView)

    @property
    def composer(self) -> Composer:
        return self.query_one(Composer)

    async def on_mount(self) -> None:
        self.query_one(ChatList).reload()
        await self.open_new_chat(self.app.initial_system)
        self.model_changed()
        self.composer.focus()

    # Model state (the app calls these when a model loads).
    def model_changed(self) -> None:
        if not self.query(ModelInfo):
            return  # not composed yet: on_mount calls this again
        info = self.query_one(ModelInfo)
        info.stage = ""
        info.info = dict(self.app.info)
        memory = self.query_one(MemoryPanel)
        memory.info = dict(self.app.info)
        memory.reset_series()
        memory.report = self.app.session.memory() if self.app.session else None
        memory.display = self.app.session is not None
        self.call_later(self._refresh_controls)
        self._header()

    def model_loading(self, name: str, stage: str, error: str = "") -> None:
        if not self.query(ModelInfo):
            self.call_later(self.model_loading, name, stage, error)
            return
        info = self.query_one(ModelInfo)
        info.info = {"name": name} if stage else dict(self.app.info)
        info.stage, info.error = stage, error

    async def _refresh_controls(self) -> None:
        specs = tuple(getattr(self.app.engine, "controls", ()) or ())
        values = {**getattr(self.app.entry, "controls", {}), **(self.conv.controls if self.conv else {})}
        await self.query_one(ComputePanel).set_controls(specs, values)

    def _header(self) -> None:
        conv = self.conv
        title = conv.title if conv else "New chat"
        model = self.app.entry_id or "no model"
        system = "" if conv is None or conv.system_prompt is None else " · own system prompt"
        self.query_one("#chat-header", Static).update(f"{title}  ·  {model}{system}")

    # Sending and streaming.
    async def on_composer_submitted(self, event: Composer.Submitted) -> None:
        if self.app.session is None or self.streaming is not None:
            self.composer.load_text(event.text)
            self.notify("Load a model first: Ctrl+O opens the models screen." if self.app.session is None
                        else "A reply is still streaming; Esc stops it.", severity="warning")
            return
        conv = self.conv
        msg = conv.add(conv.current_leaf, "user", event.text)
        conv.model_id = self.app.entry_id
        self.app.store.save(conv)
        await self.view.add_message(msg)
        self.query_one(ChatList).current = conv.id
        self.query_one(ChatList).reload()
        self._header()
        self.start_reply(msg.id)

    def start_reply(self, parent_id: str, continue_from: str | None = None) -> None:
        """Generate a reply under `parent_id` (or extend `continue_from`) in the generation worker."""
        self.streaming = continue_from or ""
        self.composer.busy = True
        self.query_one(ComputePanel).steps = ()
        self.generation_started()
        self._worker = self._generate(self.conv, parent_id, continue_from)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, conv: Conversation, parent_id: str, continue_from: str | None) -> None:
        session, worker = self.app.session, get_current_worker()
        events = session.stream(conv, parent_id, continue_from=continue_from)
        pump(events, conv_id=conv.id, message_id=lambda: continue_from or conv.current_leaf,
             post=self.post_message, is_cancelled=lambda: worker.is_cancelled, cancel=session.cancel,
             memory=session.memory)

    async def on_reply_finished(self, event: ReplyFinished) -> None:
        await self.paint_frame()
        self.streaming, self._worker = None, None
        self.composer.busy = False
        self.generation_ended()
        conv = self.conv
        if conv is None or event.conv_id != conv.id:
            return
        msg = conv.messages.get(event.message_id) if event.message_id else None
        if event.error:
            if msg is not None:
                msg.status = "error"
                msg.run["error"] = event.error
            self.notify(event.error, title="Generation failed", severity="error")
        elif event.done is not None and event.done.stop_reason == "context_full" and event.done.new_tokens == 0:
            self.notify(event.done.detail or "The context is full.", title="Context full", severity="warning")
        self.app.store.save(conv)
        view = self.view.view_for(event.message_id) if event.message_id else None
        if view is not None:
            await view.finish()
        self.view.refresh_branch_marks()
        if self.app.session is not None:
            self.query_one(MemoryPanel).report = self.app.session.memory()
        self.query_one(ChatList).reload()

    def action_stop(self) -> None:
        """Esc: stop the reply at once (the partial text stays, marked stopped), else back to the composer."""
        if self.streaming is not None and self._worker is not None:
            self.app.session.cancel()
            self._worker.cancel()
            return
        if self.focused is not self.composer:
            self.view.selected = None
            self.composer.focus()

    def action_focus_messages(self) -> None:
        self.view.focus()

    def action_toggle_chats(self) -> None:
        chat_list = self.query_one(ChatList)
        chat_list.display = not chat_list.display

    def action_toggle_panels(self) -> None:
        side = self.query_one("#side")
        side.display = not side.display

    def on_compute_panel_changed(self, event: ComputePanel.Changed) -> None:
        if self.conv is not None:
            self.conv.controls[event.name] = event.value
            if self.conv.messages:
                self.app.store.save(self.conv)

    # Tree actions on the selected message.
    def _busy(self) -> bool:
        if self.streaming is not None:
            self.notify("A reply is streaming; Esc stops it first.", severity="warning")
            return True
        return False

    @on(ConversationView.ActionRequested)
    async def on_message_action(self, event: ConversationView.ActionRequested) -> None:
        conv = self.conv
        if conv is None or event.message_id not in conv.messages or self._busy():
            return
        msg = conv.get(event.message_id)
        if event.action == "copy":
            self.app.copy_to_clipboard(msg.content)
            self.notify("Message copied to the clipboard.")
        elif event.action == "edit":
            self.app.push_screen(EditMessage(msg.role, msg.content), lambda text: self._edited(msg.id, text))
        elif event.action == "regenerate":
            await self.regenerate(msg.id)
        elif event.action == "continue":
            await self.continue_reply(msg.id)
        elif event.action == "sibling":
            chosen = conv.switch_sibling(msg.id, event.delta)
            self.app.store.save(conv)
            await self.view.show(conv, EMPTY)
            self.view.selected = chosen.id
        elif event.action == "delete":
            n = len(conv.subtree(msg.id))
            detail = f"and the {n - 1} message(s) after it on every branch" if n > 1 else "just this message"
            self.app.push_screen(Confirm("Delete this message?", detail=detail),
                                 lambda yes: self._delete_message(msg.id) if yes else None)
        elif event.action == "fork":
            await self.fork_chat(msg.id)

    async def _edited(self, message_id: str, text: str | None) -> None:
        if text is None or self.conv is None:
            return
        new = self.conv.edit(message_id, text)
        self.app.store.save(self.conv)
        await self.view.show(self.conv, EMPTY)
        if new.role == "user" and self.app.session is not None:
            self.start_reply(new.id)

    async def _delete_message(self, message_id: str) -> None:
        self.conv.delete(message_id)
        self.app.store.save(self.conv)
        await self.view.show(self.conv, EMPTY)

    async def regenerate(self, message_id: str | None = None) -> None:
        """A new reply beside the selected one (or for the selected prompt); the old one stays."""
        conv = self.conv
        if conv is None or self.app.session is None or self._busy():
            return
        target = conv.get(message_id or self.view.target_id or conv.current_leaf or "")
        parent = target.parent_id if target.role == "assistant" else target.id
        if parent is None:
            return
        conv.current_leaf = parent
        await self.view.show(conv, EMPTY)
        self.start_reply(parent)

    async def continue_reply(self, message_id: str) -> None:
        msg = self.conv.get(message_id)
        if msg.role != "assistant" or self.app.session is None:
            self.notify("Continue works on a model reply.", severity="warning")
            return
        self.conv.current_leaf = msg.id
        await self.view.show(self.conv, EMPTY)
        self.start_reply(msg.parent_id, continue_from=msg.id)

    async def action_regenerate(self) -> None:
        await self.regenerate()

    async def action_sibling(self, delta: int) -> None:
        target = self.view.target_id
        if target is not None:
            self.view.post_message(ConversationView.ActionRequested(self.view, "sibling", target, delta))

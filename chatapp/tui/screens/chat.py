"""The chat screen: chat list | conversation + branch line + composer | model, memory and compute panels.

It composes widgets that own their state and routes their messages: the message list (the one
selection), the live reply (the generation worker), the branch navigator, the chat actions (the open
chat and its tree) and the chat library (rename, delete, export, import, settings). Below a width
the side panels collapse so the conversation keeps a readable measure (chat_layout.py). The token
inspector (t on a reply) opens in the message list, its panel under it (widgets/inspector*.py).
"""
from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static

from ...textsafe import plain
from ..keys import bindings
from .chat_layout import MIN_CHAT, PanelLayout  # noqa: F401 (tests read MIN_CHAT here)
from ..widgets.branches import BranchNavigator
from ..widgets.chat_actions import ChatActions
from ..widgets.chat_library import ChatLibrary
from ..widgets.chat_list import ChatList
from ..widgets.composer import Composer
from ..widgets.compute import BUDGET_CONTROL, ComputePanel
from ..widgets.conversation import ConversationView
from ..widgets.inspector import InspectorPanel, TokenInspector
from ..widgets.inspector_actions import InspectorActions
from ..widgets.live import LiveReply
from ..widgets.memory import MemoryPanel
from ..widgets.model_info import ModelInfo



class ChatScreen(PanelLayout, Screen):
    CSS_PATH = "chat.tcss"
    BINDINGS = bindings("chat")

    def compose(self) -> ComposeResult:
        view = ConversationView(id="conversation")
        live = LiveReply(view, id="live")
        actions = ChatActions(view, live, id="actions")
        panel = InspectorPanel(id="inspector-panel")
        with Horizontal(id="body"):
            yield ChatList(self.app.store.list_chats, clock=self.app.clock, id="chat-list")
            with Vertical(id="main"):
                yield Static("", id="chat-header")
                yield view
                yield panel
                yield BranchNavigator(id="branches")
                yield Composer(self.app.store.recent_prompts(), id="composer",
                               placeholder="Message (Enter sends, Shift+Enter new line)")
            with VerticalScroll(id="side", can_focus=False):  # no invisible Tab stop; its fields scroll it
                yield ModelInfo(id="model-info")
                yield MemoryPanel(id="memory")
                yield ComputePanel(id="compute")
        yield live
        yield actions
        yield InspectorActions(actions, panel, id="inspector-actions")
        yield ChatLibrary(actions, id="library")
        yield Footer()

    # The parts (tests and benchmarks reach them through these).
    @property
    def view(self) -> ConversationView:
        return self.query_one(ConversationView)

    @property
    def composer(self) -> Composer:
        return self.query_one(Composer)

    @property
    def actions(self) -> ChatActions:
        return self.query_one(ChatActions)

    @property
    def inspector(self) -> InspectorActions:
        return self.query_one(InspectorActions)

    @property
    def live(self) -> LiveReply:
        return self.query_one(LiveReply)

    @property
    def conv(self):
        return self.actions.conv

    @property
    def streaming(self) -> str | None:
        return self.live.streaming

    async def open_chat(self, chat_id: str) -> None:
        if not self.actions.busy():
            await self.actions.open_chat(chat_id)

    async def on_mount(self) -> None:
        if self.conv is None:  # a chat opened before the screen finished mounting stays
            await self.actions.new_chat(self.app.initial_system)
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
        if self.conv is not None:
            # Only the system line depends on the model: rebuilding the chat here raced a prompt sent meanwhile
            # (its view remounted under the user, and under a test reading it).
            self.call_later(self.actions.refresh_system_line)

    def model_loading(self, name: str, stage: str, error: str = "") -> None:
        if not self.query(ModelInfo):
            self.call_later(self.model_loading, name, stage, error)
            return
        info = self.query_one(ModelInfo)
        info.info = {"name": name} if stage else dict(self.app.info)
        info.stage, info.error = stage, error

    async def _refresh_controls(self) -> None:
        specs = self.app.session.controls if self.app.session is not None else ()
        values = {**getattr(self.app.entry, "controls", {}), **(self.conv.controls if self.conv else {})}
        await self.query_one(ComputePanel).set_controls(specs, values)

    def _header(self) -> None:
        conv = self.conv
        title = conv.title if conv else "New chat"
        model = self.app.entry_id or "no model"
        system = "model's default system prompt" if conv is None or conv.system_prompt is None else "own system prompt"
        other = conv.model_id if conv is not None and conv.messages and conv.model_id != self.app.entry_id else None
        moved = f"  ·  this chat was with {other} (Ctrl+O)" if other else ""
        self.query_one("#chat-header", Static).update(plain(f"{title}  ·  {model}  ·  {system}{moved}"))

    def _context_note(self) -> None:
        """Warn in the composer's border once the next prompt nearly fills the context."""
        note = self.actions.context_note() if not self.live.busy else ""
        self.composer.border_subtitle = plain(note) if note else None
        self.composer.set_class(bool(note), "-context-warning")

    # What the parts report.
    async def on_chat_actions_changed(self, event: ChatActions.Changed) -> None:
        chat_list = self.query_one(ChatList)
        conv = event.conv
        chat_list.current = conv.id if conv is not None and conv.messages else None
        chat_list.reload()
        self._header()
        self.query_one(BranchNavigator).follow(conv, self.view.selected)
        if event.switched:
            await self._refresh_controls()
            self._show_panels_for(conv)
        self._context_note()

    def _show_panels_for(self, conv) -> None:
        """Panels describe the chat on screen: its last reply's steps, its context."""
        last = next((m for m in reversed(conv.path()) if m.role == "assistant"), None) if conv and conv.current_leaf else None
        run = last.run if last is not None else {}
        self.query_one(ComputePanel).show_reply(tuple(run.get("steps") or ()),
                                                (run.get("controls") or {}).get(BUDGET_CONTROL))
        memory = self.query_one(MemoryPanel)
        if self.app.session is not None:
            memory.report = self.app.session.memory()
            memory.reset_series()
            try:
                memory.show_context(len(self.app.session.prompt(conv).ids) if conv and conv.current_leaf else 0)
            except ValueError:
                memory.show_context(self.app.session.context_limit)

    def on_conversation_view_selection_changed(self, event: ConversationView.SelectionChanged) -> None:
        self.query_one(BranchNavigator).follow(self.conv, event.message_id)

    @on(ConversationView.ActionRequested)
    async def on_message_action(self, event: ConversationView.ActionRequested) -> None:
        if event.action == "sibling":
            navigator = self.query_one(BranchNavigator)
            navigator.follow(self.conv, event.message_id)
            if self.actions.busy() or navigator.switch(event.delta):
                return
        if event.action == "inspect":
            await self.inspector.toggle(event.message_id)
            return
        await self.actions.act(event.action, event.message_id, event.delta)

    async def on_branch_navigator_switched(self, event: BranchNavigator.Switched) -> None:
        if self.conv is not None and event.conv_id == self.conv.id:
            await self.actions.branch_switched(event.message_id)

    def on_live_reply_started(self, event: LiveReply.Started) -> None:
        self.composer.busy = True
        self.query_one(ComputePanel).begin_reply()

    def on_live_reply_progress(self, event: LiveReply.Progress) -> None:
        if event.steps:
            self.query_one(ComputePanel).add_steps(event.steps)
        if event.memory is not None:
            self.query_one(MemoryPanel).report = event.memory

    async def on_live_reply_finished(self, event: LiveReply.Finished) -> None:
        self.composer.busy = False
        await self.actions.finished(event)
        if self.app.session is not None:
            self.query_one(MemoryPanel).report = self.app.session.memory()

    async def on_composer_submitted(self, event: Composer.Submitted) -> None:
        if self.app.session is None or self.live.busy:
            self.composer.load_text(event.text)
            self.notify("Load a model first: Ctrl+O opens the models screen." if self.app.session is None
                        else "A reply is still streaming; Esc stops it.", severity="warning")
            return
        await self.actions.send(event.text)

    def on_compute_panel_changed(self, event: ComputePanel.Changed) -> None:
        if self.conv is not None:
            self.conv.controls[event.name] = event.value
            if self.conv.messages:
                self.actions.save()
        if self.live.busy and self.live.conv_id == getattr(self.conv, "id", None):
            try:  # the reply streaming now takes it from its next token (the run card records where)
                if not self.live.live_controls:
                    raise ValueError("this reply drafts ahead (draft_steps), so it keeps its compute")
                self.app.session.change_controls({event.name: event.value})
            except ValueError as e:
                self.notify(f"{event.name} applies from the next reply: {e}", severity="warning", timeout=4)

    async def on_chat_list_selected(self, event: ChatList.Selected) -> None:
        await self.open_chat(event.chat_id)
        self.composer.focus()

    def on_chat_list_delete_requested(self, event: ChatList.DeleteRequested) -> None:
        if self.conv is not None and event.chat_id == self.conv.id and self.actions.busy():
            return
        self.query_one(ChatLibrary).delete(event.chat_id, event.title)

    # Keys of the screen.
    async def action_stop(self) -> None:
        """Esc: stop the reply at once (the partial text stays, marked stopped), else close the token
        inspector, else back to the composer."""
        if self.live.stop():
            return
        if isinstance(self.focused, TokenInspector):
            await self.inspector.close()
        elif self.focused is not self.composer:
            self.composer.focus()

    def action_focus_messages(self) -> None:
        self.view.focus()

    def action_regenerate(self) -> None:
        self.view.request("regenerate")

    def action_sibling(self, delta: int) -> None:
        self.view.request("sibling", delta)

    async def action_new_chat(self) -> None:
        if not self.actions.busy():
            await self.actions.new_chat()
            self.composer.focus()

    def action_search_chats(self) -> None:
        self._want["chats"], self._last_toggled = True, "chats"
        self._layout()
        self.query_one(ChatList).focus_search()

    def action_rename_chat(self) -> None:
        self.query_one(ChatLibrary).rename()

    def action_delete_chat(self) -> None:
        conv = self.conv
        if conv is None or not conv.messages:
            self.notify("This chat is empty: nothing is saved yet.", severity="warning")
        elif not self.actions.busy():
            self.query_one(ChatLibrary).delete(conv.id, conv.title)

    def action_export_chat(self) -> None:
        self.query_one(ChatLibrary).export()

    def action_import_chat(self) -> None:
        if not self.actions.busy():
            self.query_one(ChatLibrary).import_()

    def action_chat_settings(self) -> None:
        if self.conv is not None and not self.actions.busy():
            self.query_one(ChatLibrary).settings()

"""The token inspector's actions on the chat: open it on the selected reply (t), close it, and branch at
the token under its cursor (Session.branch_at): with an alternative, with typed text, or with the token
drawn anew under the compute panel's settings. The new reply streams through the LiveReply like any
other; its figures line says how much prefill the prompt cache skipped.

A reply without a per-token record (made before the inspector existed, imported without one, or by
another program) says so and how to get one. The distribution recorded for new replies (raw, or after
the sampling settings) is an app setting (`d` in the inspector).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from textual.widget import Widget

from ...contract import INSPECT_DETAIL
from ..screens.dialogs import TextPrompt
from .chat_actions import ChatActions
from .inspector import InspectorPanel, TokenInspector

NO_RECORD = ("This reply has no per-token record (it was made before the inspector existed, imported without "
             "one, or by another program). r makes a new reply beside it that has one; `smollchat --json` "
             "prints the same figures for a one-shot answer.")
#: The app setting naming the distribution new replies record ("final": after the sampling settings).
FINAL_SETTING = "inspect_final"


class Replacement(TextPrompt):
    """The text to put in at a token. Spaces count (a token often starts with one), so none is stripped."""

    def action_save(self) -> None:
        value = self.query_one("Input").value
        if value:
            self.dismiss(value)


def control_changes(run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Token index in the reply -> controls changed while it streamed (a branch's indices count from its
    chosen prefix; a continued reply's later parts keep their own cards and are not marked)."""
    offset = int((run.get("branched_from") or {}).get("prefix_tokens", 0))
    return {offset + int(c["token"]): dict(c["controls"]) for c in run.get("control_changes", [])}


def recorded_final(store: Any) -> bool:
    """Whether new replies record probabilities after the sampling settings (the app setting)."""
    return bool(store.get_setting(FINAL_SETTING, False)) if hasattr(store, "get_setting") else False


class InspectorActions(Widget):
    """Not drawn itself."""

    DEFAULT_CSS = "InspectorActions { display: none; }"

    def __init__(self, actions: ChatActions, panel: InspectorPanel, **kw: Any) -> None:
        super().__init__(**kw)
        self.actions, self.panel = actions, panel
        self.mode = "prob"
        """The measure the last inspector coloured by (the next one starts on it)."""

    @property
    def current(self) -> TokenInspector | None:
        found = self.screen.query(TokenInspector)
        return found.first() if found else None

    async def toggle(self, message_id: str) -> None:
        """t: open the inspector on the reply, or close it if it is open there."""
        current = self.current
        if current is not None:
            same = current.message_id == message_id
            await self.close()
            if same:
                return
        await self.open(message_id)

    async def open(self, message_id: str) -> None:
        conv = self.actions.conv
        msg = conv.get(message_id) if conv is not None and message_id in conv.messages else None
        if msg is None or msg.role != "assistant":
            self.notify("The inspector shows a model reply: select one (↑ ↓) and press t.", severity="warning")
            return
        if self.actions.live.streaming == message_id:
            self.notify("This reply is still streaming: inspect it when it ends (Esc stops it).", severity="warning")
            return
        record = self._record(conv, msg)
        view = self.actions.view.view_for(message_id)
        if record is None or view is None:
            self.notify(NO_RECORD, title="Nothing to inspect", severity="warning", timeout=10)
            return
        session = self.app.session
        # Token bytes and alternatives' text come from the reply's own model's tokenizer only.
        same_model = session is not None and msg.run.get("model_id", self.app.entry_id) == self.app.entry_id
        inspector = TokenInspector(message_id, record, session.tokenizer if same_model else None, self.panel,
                                   self, self.mode, control_changes(msg.run))
        await view.open_inspector(inspector)
        inspector.focus()

    def _record(self, conv: Any, msg: Any) -> dict[str, Any] | None:
        session = self.app.session
        if session is not None:
            record = session.token_record(conv, msg.id)
        else:
            record = self.app.store.token_records([msg.id]).get(msg.id)
        if record is None or not record["ids"] or msg.token_ids and record["ids"] != list(msg.token_ids):
            return None  # a record that does not spell this reply's tokens would put a branch in the wrong place
        return record

    async def close(self) -> None:
        current = self.current
        if current is None:
            return
        self.mode = current.mode
        view = current.parent
        self.panel.close()
        await view.close_inspector()
        self.actions.view.focus()

    # What the inspector asks for.
    async def on_token_inspector_requested(self, event: TokenInspector.Requested) -> None:
        if event.action == "close":
            await self.close()
        elif event.action == "distribution":
            self.toggle_distribution()
        elif event.action == "type":
            self.app.push_screen(
                Replacement(f"Put this in at token {event.index + 1}", placeholder="text (spaces count)",
                            hint="The new reply keeps the text before this token, then yours; the model goes on."),
                lambda text: self._typed(event, text))
        else:
            await self.branch(event.message_id, event.index, event.token_id if event.action == "alternative" else None)

    async def _typed(self, event: TokenInspector.Requested, text: str | None) -> None:
        if text is not None and self.app.session is not None:
            await self.branch(event.message_id, event.index, self.app.session.tokenizer.encode(text, allow_special=False))

    async def branch(self, message_id: str, index: int, token: int | list[int] | None) -> None:
        """A new sibling reply: the source's tokens before `index`, then `token` (None: drawn anew), then the model."""
        actions, session = self.actions, self.app.session
        conv = actions.conv
        if actions.busy():
            return
        if session is None:
            self.notify("Load a model first: Ctrl+O opens the models screen.", severity="warning")
            return
        src = conv.get(message_id)
        made_by = src.run.get("model_id")
        if made_by and made_by != self.app.entry_id:
            self.notify(f"This reply came from {made_by}: load it (Ctrl+O) to branch at its tokens.", severity="warning")
            return
        before = set(conv.messages)
        channel = actions.live.channel_for(session, conv)
        try:
            events = session.branch_at(conv, message_id, index, token, channel=channel)
        except ValueError as e:
            self.notify(str(e), title="Cannot branch there", severity="warning")
            return
        new_id = next(m for m in conv.messages if m not in before)
        if token is None:
            self.notify(self._compute_note(src, conv, index), timeout=6)
        if self.current is not None:
            await self.close()
        await actions.show(select=new_id)
        actions.live.start(session, conv, src.parent_id, continue_from=new_id, select=True, events=events,
                           channel=channel)

    def _compute_note(self, src: Any, conv: Any, index: int) -> str:
        now = self.app.session.controls_for(conv)
        was = src.run.get("controls") or {}
        changed = [f"{k} {v} (was {was[k]})" for k, v in now.items() if k in was and was[k] != v]
        if changed:
            return f"Token {index + 1} on, with " + ", ".join(changed) + "."
        return (f"Token {index + 1} on, drawn anew with the same settings as before (change them in the compute "
                "panel, Ctrl+T, for other compute).")

    def toggle_distribution(self) -> None:
        """d: new replies record the model's raw probabilities, or those after the sampling settings."""
        final = not recorded_final(self.app.store)
        self.app.store.set_setting(FINAL_SETTING, final)
        if self.app.session is not None and self.app.session.inspect is not None:
            self.app.session.inspect = replace(INSPECT_DETAIL, final=final)
        self.notify("From the next reply on, the inspector records probabilities " +
                    ("after the sampling settings (penalties, temperature, top-k/p, min-p)." if final
                     else "as the model gave them (raw)."), timeout=6)

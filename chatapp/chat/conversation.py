"""A conversation as a tree of messages: edits and regenerations become siblings, nothing is overwritten.

Every message has a parent (None for a root). The chat shows one branch at a time: the path from a
root to `current_leaf`. Plain Python, no torch and no Textual: the TUI, the store and the exporters
all work on these records.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")
STATUSES = ("ok", "stopped", "error", "streaming")
#: Stop reasons after which "continue" makes sense (the reply did not end on its own).
CONTINUABLE = ("max_tokens", "cancelled", "context_full")
#: Title of a chat until its first user message names it.
DEFAULT_TITLE = "New chat"
TITLE_CHARS = 60


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """One node of the conversation tree.

    Attributes:
        id: uuid4 hex.
        parent_id: the message this one answers or follows; None for a root.
        role: "system" | "user" | "assistant".
        content: the text shown (for a reply: the streamed text so far).
        created_at: unix time; strictly increasing within a conversation, so it orders siblings.
        status: "ok" | "stopped" (the user stopped it) | "error" | "streaming".
        run: the run card of an assistant reply (model, settings, seed, controls, timings, stop
            reason, token counts, per-token steps); {} for other messages.
        token_ids: the ids the model generated for this reply, so the next prompt reuses them
            exactly; None when unknown (user text, an edited reply).
    """

    id: str
    parent_id: str | None
    role: str
    content: str
    created_at: float
    status: str = "ok"
    run: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] | None = None

    @property
    def stop_reason(self) -> str | None:
        return self.run.get("stop_reason")

    @property
    def can_continue(self) -> bool:
        """A reply that was cut off (token budget, context, or the user) can be continued."""
        return self.role == "assistant" and self.status in ("ok", "stopped") and self.stop_reason in CONTINUABLE

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "parent_id": self.parent_id, "role": self.role, "content": self.content,
                "created_at": self.created_at, "status": self.status, "run": self.run,
                "token_ids": None if self.token_ids is None else list(self.token_ids)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Message":
        """Build from `to_dict` output; ValueError names the first bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"a message must be an object, got {type(d).__name__}")
        for key in ("id", "role", "content", "created_at"):
            if key not in d:
                raise ValueError(f"message {d.get('id', '?')}: missing field {key!r}")
        mid = d["id"]
        if not isinstance(mid, str) or not mid:
            raise ValueError(f"message id must be a non-empty string, got {mid!r}")
        if d["role"] not in ROLES:
            raise ValueError(f"message {mid}: role must be one of {ROLES}, got {d['role']!r}")
        status = d.get("status", "ok")
        if status not in STATUSES:
            raise ValueError(f"message {mid}: status must be one of {STATUSES}, got {status!r}")
        if not isinstance(d["content"], str):
            raise ValueError(f"message {mid}: content must be a string")
        parent = d.get("parent_id")
        if parent is not None and not isinstance(parent, str):
            raise ValueError(f"message {mid}: parent_id must be a string or null")
        run = d.get("run") or {}
        if not isinstance(run, dict):
            raise ValueError(f"message {mid}: run must be an object")
        ids = d.get("token_ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids)):
            raise ValueError(f"message {mid}: token_ids must be a list of non-negative integers or null")
        try:
            created = float(d["created_at"])
        except (TypeError, ValueError):
            raise ValueError(f"message {mid}: created_at must be a number") from None
        return cls(mid, parent, d["role"], d["content"], created, status, dict(run), ids)


@dataclass
class Conversation:
    """A saved chat: settings plus a tree of messages; `current_leaf` marks the branch on screen.

    Attributes:
        id: uuid4 hex.
        title: shown in the chat list; set from the first user message unless renamed.
        model_id: catalog id the chat talks to (None until a model answers).
        system_prompt: None = the model's default system prompt; "" = none.
        settings: sampling overrides for this chat (SamplingSettings names; "preset" names a saved preset).
        controls: compute-control overrides (ControlSpec names).
        messages: every message of the tree, by id, in creation order.
        current_leaf: the last message of the branch on screen (None: empty chat).
    """

    id: str = field(default_factory=new_id)
    title: str = DEFAULT_TITLE
    model_id: str | None = None
    system_prompt: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    messages: dict[str, Message] = field(default_factory=dict)
    current_leaf: str | None = None

    def __post_init__(self) -> None:
        self.updated_at = self.updated_at or self.created_at

    # Reading the tree.
    def get(self, message_id: str) -> Message:
        try:
            return self.messages[message_id]
        except KeyError:
            raise KeyError(f"no message {message_id!r} in chat {self.id}") from None

    def path(self, leaf: str | None = None) -> list[Message]:
        """Messages from the root down to `leaf` (default: the current leaf)."""
        node = leaf if leaf is not None else self.current_leaf
        out: list[Message] = []
        while node is not None:
            m = self.get(node)
            out.append(m)
            node = m.parent_id
            if len(out) > len(self.messages):
                raise ValueError(f"chat {self.id}: the message tree has a cycle at {node}")
        out.reverse()
        return out

    def children(self, message_id: str | None) -> list[Message]:
        """Direct replies of a message (of the chat for None = the roots), oldest first."""
        kids = [m for m in self.messages.values() if m.parent_id == message_id]
        kids.sort(key=lambda m: m.created_at)
        return kids

    def roots(self) -> list[Message]:
        return self.children(None)

    def siblings(self, message_id: str) -> list[Message]:
        """The message and the others under the same parent, in creation order."""
        return self.children(self.get(message_id).parent_id)

    def sibling_index(self, message_id: str) -> tuple[int, int]:
        """(position of the message among its siblings, number of siblings)."""
        sibs = self.siblings(message_id)
        return next(i for i, m in enumerate(sibs) if m.id == message_id), len(sibs)

    def subtree(self, message_id: str) -> list[str]:
        """Ids of the message and all its descendants (parents before children)."""
        self.get(message_id)
        kids: dict[str | None, list[str]] = {}
        for m in self.messages.values():
            kids.setdefault(m.parent_id, []).append(m.id)
        out, todo = [], [message_id]
        while todo:
            mid = todo.pop(0)
            out.append(mid)
            todo.extend(kids.get(mid, []))
        return out

    def latest_leaf(self, message_id: str) -> str:
        """The deepest descendant reached by always taking the most recent child."""
        node = message_id
        while kids := self.children(node):
            node = kids[-1].id
        return node

    def __iter__(self) -> Iterator[Message]:
        return iter(self.path())

    # Changing the tree.
    def add(self, parent_id: str | None, role: str, content: str, **kw: Any) -> Message:
        """Append a message under `parent_id`; it becomes the current leaf.

        Keyword arguments set other Message fields (status, run, token_ids, id, created_at).
        The first user message names a chat that still has the default title.
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if parent_id is not None:
            self.get(parent_id)
        created = self._next_time(kw.pop("created_at", None))
        msg = Message(id=kw.pop("id", None) or new_id(), parent_id=parent_id, role=role, content=content,
                      created_at=created, **kw)
        if msg.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {msg.status!r}")
        if msg.id in self.messages:
            raise ValueError(f"message id {msg.id} already exists")
        self.messages[msg.id] = msg
        self.current_leaf = msg.id
        if role == "user" and self.title == DEFAULT_TITLE and content.strip():
            self.title = title_from(content)
        self.touch(created)
        return msg

    def edit(self, message_id: str, content: str) -> Message:
        """A new sibling of the message with `content` (the original stays); it becomes the leaf.

        An edited reply keeps no token ids (the model did not produce that text) and records which
        message it was edited from in its run card.
        """
        old = self.get(message_id)
        run = {"edited_from": old.id} if old.role == "assistant" else {}
        if old.role == "assistant" and old.run.get("model_id"):
            run["model_id"] = old.run["model_id"]
        return self.add(old.parent_id, old.role, content, run=run)

    def delete(self, message_id: str) -> list[str]:
        """Remove the message and its subtree; returns the removed ids.

        If the branch on screen went with it, the view moves to the nearest sibling branch (the
        previous one, else the next), else to the parent.
        """
        msg = self.get(message_id)
        gone = self.subtree(message_id)
        sibs = [m for m in self.siblings(message_id) if m.id != message_id]
        at = self.sibling_index(message_id)[0]
        for mid in gone:
            del self.messages[mid]
        if self.current_leaf in gone or self.current_leaf is None:
            if sibs:
                self.current_leaf = self.latest_leaf(sibs[max(at - 1, 0)].id)
            else:
                self.current_leaf = msg.parent_id
        self.touch()
        return gone

    def switch_sibling(self, message_id: str, delta: int) -> Message:
        """Step `delta` places among the message's siblings (clamped at the ends); the view shows the
        chosen sibling's most recent branch. Returns the chosen sibling."""
        sibs = self.siblings(message_id)
        i = next(k for k, m in enumerate(sibs) if m.id == message_id)
        chosen = sibs[min(max(i + delta, 0), len(sibs) - 1)]
        self.current_leaf = self.latest_leaf(chosen.id)
        return chosen

    def select(self, message_id: str) -> None:
        """Show the branch through `message_id` (its most recent continuation)."""
        self.current_leaf = self.latest_leaf(message_id)

    def fork(self, leaf: str | None = None) -> "Conversation":
        """A new chat holding copies (fresh ids) of the path root..leaf, with this chat's settings."""
        path = self.path(leaf)
        conv = Conversation(title=f"{self.title} (fork)", model_id=self.model_id, system_prompt=self.system_prompt,
                            settings=dict(self.settings), controls=dict(self.controls))
        parent = None
        for m in path:
            parent = conv.add(parent, m.role, m.content, status=m.status, run=dict(m.run),
                              token_ids=None if m.token_ids is None else list(m.token_ids)).id
        conv.title = f"{self.title} (fork)"
        return conv

    def clone(self) -> "Conversation":
        """A copy of the whole tree under fresh ids (importing a chat that already exists)."""
        d = self.to_dict()
        remap = {m["id"]: new_id() for m in d["messages"]}
        for m in d["messages"]:
            m["id"] = remap[m["id"]]
            m["parent_id"] = remap.get(m["parent_id"]) if m["parent_id"] else None
        d["id"] = new_id()
        d["current_leaf"] = remap.get(d["current_leaf"]) if d["current_leaf"] else None
        return Conversation.from_dict(d)

    def touch(self, when: float | None = None) -> None:
        self.updated_at = max(when or time.time(), self.updated_at)

    def _next_time(self, wanted: float | None = None) -> float:
        # Siblings are ordered by creation time; two messages made in the same clock tick must not tie.
        last = max((m.created_at for m in self.messages.values()), default=0.0)
        return max(time.time() if wanted is None else float(wanted), last + 1e-6)

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "model_id": self.model_id, "system_prompt": self.system_prompt,
                "settings": dict(self.settings), "controls": dict(self.controls), "created_at": self.created_at,
                "updated_at": self.updated_at, "current_leaf": self.current_leaf,
                "messages": [m.to_dict() for m in self.messages.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Conversation":
        """Build and validate (parents exist, no cycles, leaf exists); ValueError says what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a conversation must be an object, got {type(d).__name__}")
        if not isinstance(d.get("id"), str) or not d["id"]:
            raise ValueError("conversation id must be a non-empty string")
        raw = d.get("messages", [])
        if not isinstance(raw, list):
            raise ValueError("messages must be a list")
        msgs = [Message.from_dict(m) for m in raw]
        by_id: dict[str, Message] = {}
        for m in sorted(msgs, key=lambda m: m.created_at):
            if m.id in by_id:
                raise ValueError(f"message id {m.id} appears twice")
            by_id[m.id] = m
        for m in msgs:
            if m.parent_id is not None and m.parent_id not in by_id:
                raise ValueError(f"message {m.id} answers {m.parent_id}, which is not in the chat")
        for key in ("settings", "controls"):
            if not isinstance(d.get(key) or {}, dict):
                raise ValueError(f"{key} must be an object")
        system = d.get("system_prompt")
        if system is not None and not isinstance(system, str):
            raise ValueError("system_prompt must be a string or null")
        try:
            created = float(d.get("created_at") or time.time())
            updated = float(d.get("updated_at") or created)
        except (TypeError, ValueError):
            raise ValueError("created_at and updated_at must be numbers") from None
        model = d.get("model_id")
        if model is not None and not isinstance(model, str):
            raise ValueError("model_id must be a string or null")
        conv = cls(id=d["id"], title=str(d.get("title") or DEFAULT_TITLE), model_id=model,
                   system_prompt=system, settings=dict(d.get("settings") or {}),
                   controls=dict(d.get("controls") or {}), created_at=created, updated_at=updated, messages=by_id)
        for m in msgs:
            conv.path(m.id)  # raises on a cycle
        leaf = d.get("current_leaf")
        if leaf is not None and leaf not in by_id:
            raise ValueError(f"current_leaf {leaf} is not a message of the chat")
        if leaf is None and by_id:
            leaf = conv.latest_leaf(conv.roots()[-1].id) if conv.roots() else None
        conv.current_leaf = leaf
        return conv


def title_from(text: str) -> str:
    """A chat title from a message: its first non-empty line, shortened."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"

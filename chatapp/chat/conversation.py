"""A conversation as a tree of messages: edits and regenerations become siblings, nothing is overwritten.

Every message has a parent (None for a root). The chat shows one branch at a time: the path from a
root to `current_leaf`. Plain Python, no torch and no Textual: the TUI, the store and the exporters
all work on these records.

`Conversation.from_dict` is the one validator of chat data, whatever its source: an import is checked
strictly (the first fault raises ValueError), rows read back from the database with `repair=True`
(faults are fixed or the message skipped, each with a reason in `Conversation.repairs`).
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..contract import SamplingSettings

ROLES = ("system", "user", "assistant")
STATUSES = ("ok", "stopped", "error", "streaming")
#: Stop reasons after which "continue" makes sense (the reply did not end on its own; "interrupted":
#: the app was killed while it streamed, see chat.store).
CONTINUABLE = ("max_tokens", "cancelled", "context_full", "interrupted")
#: Title of a chat until its first user message names it.
DEFAULT_TITLE = "New chat"
TITLE_CHARS = 60
#: Limits on chat data from outside (an import, a database row): beyond them the data is damaged or hostile.
MAX_DEPTH = 32  # JSON nesting; the chat format itself needs 7 levels
MAX_TIME = 253402300799.0  # 9999-12-31: the latest time `time.gmtime` and the chat list can show
MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 1000
MAX_TOKEN_ID = 2**31 - 1


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
    def from_dict(cls, d: dict[str, Any], repairs: list[str] | None = None) -> "Message":
        """Build from `to_dict` output, checking every field (types, ranges, Unicode, depth).

        Strict by default: ValueError names the first bad field. With a `repairs` list, a fault that
        has a safe fix (a bad run-card entry dropped, bad token ids forgotten, an unknown status read
        as stopped) is fixed and described there; ValueError only when the message cannot be used.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a message must be an object, got {_show(d)}")
        mid = d.get("id")
        if problem := _ID(mid):
            raise ValueError(f"message id {problem[1]}")
        for key in ("role", "content", "created_at"):
            if key not in d:
                raise ValueError(f"message {mid}: missing field {key!r}")
        if d["role"] not in ROLES:
            raise ValueError(f"message {mid}: role must be one of {ROLES}, got {_show(d['role'])}")
        content = d["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {mid}: content must be a string, got {_show(content)}")
        if not _unicode_ok(content):
            _fault(repairs, f"message {mid}: content is not valid Unicode", "lone surrogates replaced")
            content = clean_text(content)
        created = d["created_at"]
        if problem := _TIME(created):
            _fault(repairs, f"message {mid}: created_at {problem[1]}", "read as 0")
            created = 0.0
        status = d.get("status", "ok")
        if status not in STATUSES:
            _fault(repairs, f"message {mid}: status must be one of {STATUSES}, got {_show(status)}",
                   "read as stopped")
            status = "stopped"
        parent = d.get("parent_id")
        if parent is not None and (problem := _ID(parent)):
            _fault(repairs, f"message {mid}: parent_id must be null or a message id: it {problem[1]}",
                   "made a first message")
            parent = None
        run = d.get("run")
        run = {} if run is None else run
        if not isinstance(run, dict):
            _fault(repairs, f"message {mid}: run must be an object, got {_show(run)}", "dropped")
            run = {}
        run = _checked(run, _RUN, f"message {mid}: run", repairs)
        ids = d.get("token_ids")
        if ids is not None and (problem := _TOKEN_IDS(ids)):
            _fault(repairs, f"message {mid}: token_ids must be null or a list of token ids: "
                            f"{('item' + problem[0]) if problem[0] else 'it'} {problem[1]}",
                   "dropped: the text is encoded again")
            ids = None
        return cls(mid, parent, d["role"], content, float(created), status, run,
                   None if ids is None else list(ids))


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
        repairs: what `from_dict(..., repair=True)` fixed or skipped, one sentence each (not saved).
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
    repairs: list[str] = field(default_factory=list, compare=False, repr=False)

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
        newest: dict[str | None, Message] = {}  # one pass, not one scan per level: chains can be long
        for m in self.messages.values():
            if m.parent_id not in newest or m.created_at >= newest[m.parent_id].created_at:
                newest[m.parent_id] = m
        node = message_id
        while node in newest:
            node = newest[node].id
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

    def clone(self, remap: dict[str, str] | None = None) -> "Conversation":
        """A copy of the whole tree under fresh ids (importing a chat that already exists); `remap`, when
        given, receives each old message id's new one."""
        d = self.to_dict()
        remap = {} if remap is None else remap
        remap.update({m["id"]: new_id() for m in d["messages"]})
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
    def from_dict(cls, d: dict[str, Any], *, repair: bool = False) -> "Conversation":
        """Build and validate every field and the tree (parents exist, no cycles, leaf exists).

        Strict (an import): ValueError says what is wrong. `repair=True` (rows read back from the
        database): faults are fixed where that is safe, unusable messages skipped (their replies move
        up to the nearest kept ancestor), and every change is described in `repairs`.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a conversation must be an object, got {_show(d)}")
        if problem := _ID(d.get("id")):
            raise ValueError(f"conversation id {problem[1]}")
        fix: list[str] | None = [] if repair else None
        raw = d.get("messages", [])
        if not isinstance(raw, list):
            raise ValueError(f"messages must be a list, got {_show(raw)}")
        title = d.get("title")
        if title is None or (isinstance(title, str) and not title.strip()):
            title = DEFAULT_TITLE
        elif problem := _TEXT(title):
            _fault(fix, f"title {problem[1]}", "reset")
            title = DEFAULT_TITLE
        elif len(title) > MAX_TITLE_CHARS:
            _fault(fix, f"title is longer than {MAX_TITLE_CHARS} characters", "shortened")
            title = title[:MAX_TITLE_CHARS]
        fields_: dict[str, Any] = {}
        for key, check in (("model_id", _OPT_ID), ("system_prompt", _OPT_TEXT)):
            value = d.get(key)
            if problem := check(value):
                _fault(fix, f"{key} {problem[1]}", "reset")
                value = None
            fields_[key] = value
        fields_["settings"] = _settings(d.get("settings"), fix)
        fields_["controls"] = _checked(_object(d.get("controls"), "controls", fix), _CONTROLS, "controls", fix)
        now = time.time()
        for key, default in (("created_at", now), ("updated_at", None)):
            value = d.get(key)
            if value is None:
                value = default if default is not None else fields_["created_at"]
            elif problem := _TIME(value):
                _fault(fix, f"{key} {problem[1]}", "reset")
                value = now
            fields_[key] = float(value)

        by_id: dict[str, Message] = {}
        skipped: dict[str, str | None] = {}  # id of a skipped message -> its parent, for its replies
        for i, item in enumerate(raw):
            try:
                m = Message.from_dict(item, fix)
            except ValueError as e:
                if fix is None:
                    raise
                fix.append(f"skipped message #{i + 1}: {e}")
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    skipped[item["id"]] = item.get("parent_id") if isinstance(item.get("parent_id"), str) else None
                continue
            if m.id in by_id:
                _fault(fix, f"message id {m.id} appears twice", "the second is skipped")
                continue
            by_id[m.id] = m
        for m in by_id.values():
            parent, seen = m.parent_id, set()
            while parent is not None and parent not in by_id and parent in skipped and parent not in seen:
                seen.add(parent)
                parent = skipped[parent]
            if parent is not None and parent not in by_id:
                _fault(fix, f"message {m.id} answers {m.parent_id}, which is not in the chat",
                       "made a first message")
                parent = None
            elif parent != m.parent_id:
                fix.append(f"message {m.id} answered a skipped message; it now follows {parent or 'nothing'}")
            m.parent_id = parent
        _break_cycles(by_id, fix)
        ordered = dict(sorted(by_id.items(), key=lambda kv: kv[1].created_at))
        conv = cls(id=d["id"], title=title, messages=ordered, **fields_)
        leaf = d.get("current_leaf")
        if leaf is not None and (not isinstance(leaf, str) or leaf not in ordered):
            _fault(fix, f"current_leaf {_show(leaf)} is not a message of the chat", "the latest branch is shown")
            leaf = None
        if leaf is None and ordered:
            leaf = conv.latest_leaf(conv.roots()[-1].id) if conv.roots() else None
        conv.current_leaf = leaf
        conv.repairs = fix or []
        return conv


def title_from(text: str) -> str:
    """A chat title from a message: its first non-empty line, shortened."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 1].rstrip() + "…"


def parse_json(text: str, what: str) -> Any:
    """`json.loads` that cannot blow the stack: nesting beyond MAX_DEPTH is refused before parsing
    (json.loads recurses, so 100,000 nested brackets would raise RecursionError)."""
    depth = _json_depth(text)
    if depth > MAX_DEPTH:
        raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep; a chat never is, so the file is "
                         "damaged or not a chat")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise ValueError(f"{what} is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not valid JSON ({e})") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), counted up to MAX_DEPTH + 1."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = top = 0
    for ch in brackets:
        if ch in "[{":
            depth += 1
            if depth > top:
                top = depth
                if top > MAX_DEPTH:
                    break
        else:
            depth -= 1
    return top


def clean_text(text: str) -> str:
    """The text with lone surrogates (which UTF-8, SQLite and terminals cannot carry) replaced by U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _unicode_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fault(repairs: list[str] | None, what: str, fix: str = "") -> None:
    """Strict checking (no list) raises; repair mode records what is wrong and what it does about it."""
    if repairs is None:
        raise ValueError(what)
    repairs.append(f"{what} ({fix})" if fix else what)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Checkers: value -> None when it fits, else (where inside the value, what is wrong).


def _kind(ok: Callable[[Any], bool], what: str) -> Callable[[Any], Any]:
    return lambda v: None if ok(v) else ("", f"must be {what}, got {_show(v)}")


def _opt(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else check(v)


def _list(item: Callable[[Any], Any], types: frozenset[type] | None = None,
          bounds: tuple[int, int] | None = None) -> Callable[[Any], Any]:
    """A list of items passing `item`. With `types` (and `bounds`), a list whose items are all of those exact
    types (within bounds) passes without a call per item: per-token lists are long and many."""
    def check(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):  # a tuple only from memory (a clone); JSON gives lists
            return "", f"must be a list, got {_show(v)}"
        if types is not None and set(map(type, v)) <= types and (
                bounds is None or not v or bounds[0] <= min(v) and max(v) <= bounds[1]):
            return None
        for i, x in enumerate(v):
            if problem := item(x):
                return f"[{i}]{problem[0]}", problem[1]
        return None
    return check


def _record(schema: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """An object whose known keys have their own check; other keys must be plain JSON (newer versions)."""
    def check(v: Any) -> Any:
        if not isinstance(v, dict):
            return "", f"must be an object, got {_show(v)}"
        for k, x in v.items():
            if problem := schema.get(k, _json)(x):
                return f".{k}{problem[0]}", problem[1]
        return None
    return check


def _json(v: Any) -> Any:
    """Plain JSON data (objects with string keys, lists, strings, numbers, booleans, null), bounded depth."""
    todo = [(v, "", 0)]
    while todo:
        x, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            return path, f"is nested more than {MAX_DEPTH} levels deep"
        if isinstance(x, dict):
            for k, y in x.items():
                if not isinstance(k, str):
                    return path, f"has a key that is not a string ({_show(k)})"
                todo.append((y, f"{path}.{k}", depth + 1))
        elif isinstance(x, list):
            todo.extend((y, f"{path}[{i}]", depth + 1) for i, y in enumerate(x))
        elif isinstance(x, str):
            if not _unicode_ok(x):
                return path, "is not valid Unicode"
        elif x is not None and not isinstance(x, (bool, int, float)):
            return path, f"is not JSON data ({type(x).__name__})"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TEXT = _kind(lambda v: isinstance(v, str) and _unicode_ok(v), "a string")
_OPT_TEXT = _opt(_TEXT)
_ID = _kind(lambda v: isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS and _unicode_ok(v),
            f"a non-empty string of at most {MAX_ID_CHARS} characters")
_OPT_ID = _opt(_ID)
_BOOL = _kind(lambda v: isinstance(v, bool), "true or false")
_COUNT = _kind(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_SEED = _kind(lambda v: _is_int(v) and 0 <= v < 2**64, "an integer in [0, 2**64)")
_TIME = _kind(lambda v: _is_num(v) and math.isfinite(v) and 0 <= v <= MAX_TIME,
              "a time in seconds since 1970 (a finite number, not beyond the year 9999)")
_RATE = _opt(_kind(lambda v: _is_num(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"))
_NUMBER = _opt(_kind(_is_num, "a number"))
_TOKEN_IDS = _list(_kind(lambda v: _is_int(v) and 0 <= v <= MAX_TOKEN_ID, f"an integer in [0, {MAX_TOKEN_ID}]"),
                   frozenset({int}), (0, MAX_TOKEN_ID))
_NUMBERS = _list(_NUMBER, frozenset({int, float, type(None)}))


def _OBJECT(v: Any) -> Any:  # noqa: N802 - named like the other checkers
    return _json(v) if isinstance(v, dict) else ("", f"must be an object, got {_show(v)}")


_SCALAR = _kind(lambda v: v is None or isinstance(v, (bool, str)) and _unicode_ok(str(v))
                or _is_num(v) and math.isfinite(v), "a string, a finite number, true/false or null")

# A reply's run card, as chat.session writes it: every field the app reads back has its type here.
_SEGMENT = {
    "model_id": _TEXT, "model_name": _TEXT, "revision": _OPT_TEXT, "demo": _BOOL, "demo_seed": _opt(_SEED),
    "app_version": _OPT_TEXT, "engine": _record({"device": _TEXT, "dtype": _TEXT, "context_limit": _opt(_COUNT)}),
    "settings": _OBJECT, "seed": _opt(_SEED), "controls": _OBJECT, "system_prompt": _OPT_TEXT,
    "prompt_tokens": _COUNT,
    "context": _record({"dropped_messages": _list(_TEXT), "dropped_turns": _COUNT, "reused_replies": _COUNT,
                        "resumed_from_snapshot": _COUNT}),
    "started_at": _TIME, "finished_at": _TIME, "stop_reason": _TEXT, "detail": _OPT_TEXT,
    "new_tokens": _COUNT, "reused_tokens": _COUNT,
    "timings": _record({"ttft_s": _RATE, "prefill_tok_s": _RATE, "decode_tok_s": _RATE}),
}
_RUN = {**_SEGMENT, "tokens": _record({"logprob": _NUMBERS, "entropy": _NUMBERS}),
        "steps": _list(_opt(_COUNT), frozenset({int}), (0, 2**63)), "continued": _list(_record(_SEGMENT)),
        "edited_from": _TEXT, "error": _TEXT, "interrupted": _BOOL}
_CONTROLS: dict[str, Callable[[Any], Any]] = {}
_SETTING_TYPES = {"stop_strings": _list(_TEXT), "stop_ids": _TOKEN_IDS, "preset": _TEXT}


def _checked(obj: dict[str, Any], schema: dict[str, Callable[[Any], Any]], where: str,
             repairs: list[str] | None) -> dict[str, Any]:
    """A copy of obj whose keys pass their checks (`schema`, else: plain JSON for a run card, a scalar for
    controls); strict raises on the first that does not, repair drops it."""
    other = _json if schema is _RUN else _SCALAR
    out = {}
    for k, v in obj.items():
        if problem := (_TEXT(k) or schema.get(k, other)(v)):
            _fault(repairs, f"{where}.{k}{problem[0]} {problem[1]}", "dropped")
            continue
        out[k] = v
    return out


def _object(value: Any, name: str, repairs: list[str] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fault(repairs, f"{name} must be an object, got {_show(value)}", "dropped")
        return {}
    return value


def _settings(value: Any, repairs: list[str] | None) -> dict[str, Any]:
    """The chat's sampling overrides, each checked by the engine contract's one validator."""
    out = {}
    for k, v in _object(value, "settings", repairs).items():
        try:
            if problem := (_TEXT(k) or _SETTING_TYPES.get(k, _SCALAR)(v)):
                raise ValueError(f"{problem[0].lstrip('.')} {problem[1]}".strip())
            if k != "preset":
                SamplingSettings().with_overrides(**{k: v}).validate()
        except (TypeError, ValueError) as e:
            _fault(repairs, f"settings.{k}: {e}", "dropped")
            continue
        out[k] = v
    return out


def _break_cycles(by_id: dict[str, Message], repairs: list[str] | None) -> None:
    """Messages not reachable from a first message sit on (or under) a parent cycle: strict raises,
    repair cuts each cycle by making one of its messages a first message."""
    kids: dict[str | None, list[str]] = {}
    for m in by_id.values():
        kids.setdefault(m.parent_id, []).append(m.id)
    reached: set[str] = set()

    def reach(start: str | None) -> None:
        todo = list(kids.get(start, [])) if start is None else [start]
        while todo:
            mid = todo.pop()
            reached.add(mid)
            todo.extend(kids.get(mid, []))

    reach(None)
    for mid in by_id:
        if mid in reached:
            continue
        node, seen = mid, set()
        while node not in seen:  # climb until the walk repeats: that node is on the cycle
            seen.add(node)
            node = by_id[node].parent_id
        _fault(repairs, f"the message tree has a cycle at {node}", "made a first message")
        kids[by_id[node].parent_id].remove(node)
        by_id[node].parent_id = None
        reach(node)

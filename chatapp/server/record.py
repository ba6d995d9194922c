"""`smollchat serve --record`: served conversations go into the chat store, so they open in the TUI.

OpenAI clients resend the whole history with every request. A request whose history (system prompt
and messages before its last one) is exactly a conversation this server recorded, ending in the reply
it gave, continues that chat (the new turn is added under that reply) instead of starting a new one.
The index of recorded histories is kept in memory and in the store's app settings (one row per history,
`serve.history.<sha256>`), so a history resent after a restart still continues its chat.
Recording holds one lock around attach -> stream -> remember, so two requests extending the same chat
cannot save over each other's turns.
"""
from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

from ..chat.conversation import Conversation

#: Recorded histories remembered in memory (oldest forgotten first; the store keeps every one).
MAX_REMEMBERED = 10_000
#: The store's app-settings key of a recorded history.
STORED_KEY = "serve.history.{}"


def history_key(system: str | None, turns: list[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps([system, turns], ensure_ascii=False).encode()).hexdigest()


class Recorder:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.lock = threading.Lock()
        self._known: dict[str, tuple[str, str]] = {}  # history key -> (chat id, id of the reply it ends in)

    def attach(self, request_conv: Conversation, model_id: str) -> Conversation:
        """The conversation to stream into: the recorded chat this request extends (with the new turn
        added), else the request's own conversation as a new chat. Call with `lock` held."""
        path = request_conv.path()
        turns = [(m.role, m.content) for m in path]
        key = history_key(request_conv.system_prompt, turns[:-1])
        known = self._known.get(key) or _pair(self.store.get_setting(STORED_KEY.format(key)))
        if known is not None:
            chat_id, leaf = known
            try:
                conv = self.store.load(chat_id)
                conv.get(leaf)
            except KeyError:
                conv = None  # deleted in the TUI meanwhile: record as a new chat
            if conv is not None:
                conv.add(leaf, path[-1].role, path[-1].content)
                conv.settings, conv.controls = dict(request_conv.settings), dict(request_conv.controls)
                return conv
        request_conv.model_id = model_id
        return request_conv

    def remember(self, conv: Conversation) -> None:
        """Index the recorded chat by its history up to and including the reply just made."""
        if conv.current_leaf is None:
            return
        turns = [(m.role, m.content) for m in conv.path()]
        key = history_key(conv.system_prompt, turns)
        self._known[key] = (conv.id, conv.current_leaf)
        self.store.set_setting(STORED_KEY.format(key), [conv.id, conv.current_leaf])
        while len(self._known) > MAX_REMEMBERED:
            self._known.pop(next(iter(self._known)))


def _pair(value: Any) -> tuple[str, str] | None:
    """A stored (chat id, reply id), or None for a missing or damaged row."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None

"""`serve --record`'s index of recorded histories outlives the server: a history resent to a restarted
server continues the chat it extends (server/record.py)."""
from __future__ import annotations

from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store
from chatapp.server.record import STORED_KEY, Recorder, history_key


def _request(turns, system=None):
    conv = Conversation(system_prompt=system)
    parent = None
    for role, text in turns:
        parent = conv.add(parent, role, text).id
    return conv


def _served(recorder, turns, reply):
    with recorder.lock:
        conv = recorder.attach(_request(turns), "axiom-tiny")
        conv.add(conv.path()[-1].id, "assistant", reply)
        recorder.store.save(conv)
        recorder.remember(conv)
    return conv


def test_a_history_resent_after_a_restart_continues_its_chat(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    first = _served(Recorder(store), [("user", "Remember 42.")], "Noted.")
    again = Recorder(store)  # a restarted server: nothing in memory
    history = [("user", "Remember 42."), ("assistant", "Noted."), ("user", "Which number?")]
    conv = _served(again, history, "42.")
    assert conv.id == first.id and len(store.list_chats()) == 1
    assert [(m.role, m.content) for m in store.load(first.id).path()] == history + [("assistant", "42.")]
    # Another history (a different first turn) starts a chat of its own.
    other = _served(again, [("user", "Remember 7."), ("assistant", "Noted."), ("user", "Which?")], "7.")
    assert other.id != first.id and len(store.list_chats()) == 2


def test_a_damaged_or_dangling_stored_entry_starts_a_new_chat(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    history = [("user", "Hello"), ("assistant", "Hi."), ("user", "And?")]
    key = history_key(None, history[:-1])
    store.set_setting(STORED_KEY.format(key), "not a pair")
    assert Recorder(store).attach(_request(history), "axiom-tiny").model_id == "axiom-tiny"  # its own, new
    store.set_setting(STORED_KEY.format(key), ["no-such-chat", "no-such-reply"])
    conv = Recorder(store).attach(_request(history), "axiom-tiny")
    assert not store.exists(conv.id) and len(conv.path()) == 3
    store.close()

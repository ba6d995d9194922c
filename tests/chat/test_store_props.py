"""Property test: random sequences of store operations (new chats, streamed replies, edits, deletes,
renames, reopening the file, a disk that fills up and frees again) leave exactly what a plain in-memory
model of the chats holds: what could not be written waits in memory and is written by the retry."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store, StoreUnavailable
from props import PROPS

TEXT = st.text(max_size=30)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Memory-backed when the system has it: every commit syncs, and a run makes hundreds.
        shm = Path("/dev/shm")
        self.dir = Path(tempfile.mkdtemp(prefix="smollchat-props-", dir=shm if shm.is_dir() else None))
        self.store = Store(self.dir / "chats.sqlite3")
        self.chats: dict[str, Conversation] = {}  # the model: what the store must give back
        self.full = False

    def _write(self, fn, *args) -> bool:
        """Run a write; while the disk is full it may fail, but only as StoreUnavailable."""
        try:
            fn(*args)
        except StoreUnavailable as e:
            assert self.full and e.reason == "full", e
            event("a write failed and waits in memory")
            return False
        return True

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _chat(self, data) -> Conversation:
        return self.chats[data.draw(st.sampled_from(list(self.chats)))]

    @rule(title=TEXT, text=TEXT)
    def new_chat(self, title, text):
        c = Conversation(title=title.strip() or "New chat")
        c.add(None, "user", text)
        self._write(self.store.save, c)
        self.chats[c.id] = c

    @precondition(lambda self: self.chats)
    @rule(data=st.data(), pieces=st.lists(TEXT, min_size=1, max_size=4), stopped=st.booleans())
    def stream_reply(self, data, pieces, stopped):
        """A reply saved piece by piece while it streams, then once at its end."""
        c = self._chat(data)
        m = c.add(c.current_leaf, "assistant", "", status="streaming", run={"seed": 1}, token_ids=[])
        self._write(self.store.save, c)
        for i, piece in enumerate(pieces):
            m.content += piece * 50
            m.token_ids.append(i)
            self._write(self.store.save_message, c.id, m)
        m.status = "stopped" if stopped else "ok"
        m.run["stop_reason"] = "cancelled" if stopped else "eos"
        self._write(self.store.save_message, c.id, m, m.id)

    @precondition(lambda self: any(c.messages for c in self.chats.values()))
    @rule(data=st.data(), text=TEXT)
    def edit(self, data, text):
        c = self.chats[data.draw(st.sampled_from([k for k, c in self.chats.items() if c.messages]))]
        c.edit(data.draw(st.sampled_from(list(c.messages))), text)
        self._write(self.store.save, c)

    @precondition(lambda self: any(len(c.messages) > 1 for c in self.chats.values()))
    @rule(data=st.data())
    def delete_message(self, data):
        c = self.chats[data.draw(st.sampled_from([k for k, c in self.chats.items() if len(c.messages) > 1]))]
        c.delete(data.draw(st.sampled_from(list(c.messages))))
        self._write(self.store.save, c)

    @precondition(lambda self: self.chats)
    @rule(data=st.data(), title=TEXT.filter(str.strip))
    def rename(self, data, title):
        c = self._chat(data)
        if c.id in self.store.pending:  # renaming is not kept for a retry: the user does it again
            return
        if self._write(self.store.rename, c.id, title):
            c.title = title.strip()

    @precondition(lambda self: self.chats)
    @rule(data=st.data())
    def delete_chat(self, data):
        c = self._chat(data)
        if self._write(self.store.delete, c.id):
            del self.chats[c.id]

    @precondition(lambda self: not self.full)
    @rule()
    def disk_fills(self):
        """From now on the file may not grow (SQLite then fails exactly as on a full disk)."""
        pages = self.store._conn.execute("PRAGMA page_count").fetchone()[0]
        self.store._conn.execute(f"PRAGMA max_page_count = {pages}")
        self.full = True

    @precondition(lambda self: self.full)
    @rule()
    def disk_frees(self):
        """Space is back; the retry reconnects, which drops the page limit with the old connection."""
        self.full = False
        if self.store._broken is None:  # the limit was never reached: lift it on this connection
            self.store._conn.execute("PRAGMA max_page_count = 1073741823")
        self.store.retry()
        assert self.store.pending == []

    @rule()
    def reopen(self):
        if self.full:
            self.disk_frees()
        self.store.close()
        self.store = Store(self.dir / "chats.sqlite3")

    @invariant()
    def holds_what_the_model_holds(self):
        listed = {s.id for s in self.store.list_chats()}  # the file's chats: a new one may still be pending
        assert set(self.chats) - set(self.store.pending) <= listed <= set(self.chats)
        for cid, c in self.chats.items():
            back = self.store.load(cid)
            want, got = c.to_dict(), back.to_dict()
            assert got.pop("updated_at") >= want.pop("updated_at") - 1e-6
            assert got == want and back.repairs == []


StoreMachine.TestCase.settings = PROPS
test_store_matches_the_reference_model = StoreMachine.TestCase

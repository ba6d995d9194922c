"""Property test: random sequences of store operations (new chats, streamed replies, edits, deletes,
renames, reopening the file) leave exactly what a plain in-memory model of the chats holds."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store
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

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _chat(self, data) -> Conversation:
        return self.chats[data.draw(st.sampled_from(list(self.chats)))]

    @rule(title=TEXT, text=TEXT)
    def new_chat(self, title, text):
        c = Conversation(title=title.strip() or "New chat")
        c.add(None, "user", text)
        self.store.save(c)
        self.chats[c.id] = c

    @precondition(lambda self: self.chats)
    @rule(data=st.data(), pieces=st.lists(TEXT, min_size=1, max_size=4), stopped=st.booleans())
    def stream_reply(self, data, pieces, stopped):
        """A reply saved piece by piece while it streams, then once at its end."""
        c = self._chat(data)
        m = c.add(c.current_leaf, "assistant", "", status="streaming", run={"seed": 1}, token_ids=[])
        self.store.save(c)
        for i, piece in enumerate(pieces):
            m.content += piece
            m.token_ids.append(i)
            self.store.save_message(c.id, m)
        m.status = "stopped" if stopped else "ok"
        m.run["stop_reason"] = "cancelled" if stopped else "eos"
        self.store.save_message(c.id, m, current_leaf=m.id)

    @precondition(lambda self: any(c.messages for c in self.chats.values()))
    @rule(data=st.data(), text=TEXT)
    def edit(self, data, text):
        c = self.chats[data.draw(st.sampled_from([k for k, c in self.chats.items() if c.messages]))]
        c.edit(data.draw(st.sampled_from(list(c.messages))), text)
        self.store.save(c)

    @precondition(lambda self: any(len(c.messages) > 1 for c in self.chats.values()))
    @rule(data=st.data())
    def delete_message(self, data):
        c = self.chats[data.draw(st.sampled_from([k for k, c in self.chats.items() if len(c.messages) > 1]))]
        c.delete(data.draw(st.sampled_from(list(c.messages))))
        self.store.save(c)

    @precondition(lambda self: self.chats)
    @rule(data=st.data(), title=TEXT.filter(str.strip))
    def rename(self, data, title):
        c = self._chat(data)
        self.store.rename(c.id, title)
        c.title = title.strip()

    @precondition(lambda self: self.chats)
    @rule(data=st.data())
    def delete_chat(self, data):
        c = self._chat(data)
        self.store.delete(c.id)
        del self.chats[c.id]

    @rule()
    def reopen(self):
        self.store.close()
        self.store = Store(self.dir / "chats.sqlite3")

    @invariant()
    def holds_what_the_model_holds(self):
        assert {s.id for s in self.store.list_chats()} == set(self.chats)
        for cid, c in self.chats.items():
            back = self.store.load(cid)
            want, got = c.to_dict(), back.to_dict()
            assert got.pop("updated_at") >= want.pop("updated_at") - 1e-6
            assert got == want and back.repairs == []


StoreMachine.TestCase.settings = PROPS
test_store_matches_the_reference_model = StoreMachine.TestCase

"""The token inspector's data (issue 15): each reply's per-token record, kept by the session, stored in
its own table (schema v3, keyed by message id), exported in JSON and carried through import."""
from __future__ import annotations

import json
import sqlite3

import pytest

from chatapp.chat import export
from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import FakeEngine, FakeTokenizer, fake_entry
from chatapp.chat.session import Session
from chatapp.chat.store import SCHEMA_VERSION, Store
from chatapp.chat.token_record import check
from chatapp.contract import RUN_CARD_DETAIL, Done, TokenDetail


class Asked(FakeEngine):
    """A FakeEngine that remembers the TokenDetail of each call."""

    def generate(self, ids, settings=None, controls=None, *, cancel=None, detail=TokenDetail()):
        self.asked = detail
        return super().generate(ids, settings, controls, cancel=cancel, detail=detail)


def _session(tmp_path, replies=("alpha beta gamma delta",), **kw):
    store = Store(tmp_path / "chats.sqlite3")
    entry = kw.pop("entry", None) or fake_entry()
    eng = Asked(list(replies), FakeTokenizer())
    return eng, Session(eng, eng.tokenizer, entry, store=store, **kw), store


def _reply(s, conv, parent, **kw):
    events = list(s.stream(conv, parent, **kw))
    assert isinstance(events[-1], Done)
    return events[:-1], conv.get(conv.current_leaf)


def test_each_reply_keeps_its_per_token_record_in_the_store(tmp_path):
    eng, s, store = _session(tmp_path)
    conv = Conversation()
    u = conv.add(None, "user", "go")
    events, reply = _reply(s, conv, u.id)
    assert eng.asked.alternatives == 5 and eng.asked.logprob and eng.asked.entropy and not eng.asked.final
    record = store.token_records([reply.id])[reply.id]
    assert record["distribution"] == "raw" and record["ids"] == reply.token_ids == [e.token_id for e in events]
    assert "".join(record["text"]) == reply.content
    assert record["logprob"] == [round(e.logprob, 5) for e in events]
    assert record["alternatives"] == [[[i, round(lp, 5)] for i, lp in e.alternatives] for e in events]
    assert check(record, "stored") == record
    store.close()
    with Store(tmp_path / "chats.sqlite3") as again:  # a new program run reads it back through a session
        s2 = Session(eng, eng.tokenizer, fake_entry(), store=again)
        assert s2.token_record(again.load(conv.id), reply.id) == record
        again.delete(conv.id)  # the record goes with its chat
        assert again.token_records([reply.id]) == {}


def test_without_inspect_only_the_run_cards_figures_are_asked_and_nothing_is_stored(tmp_path):
    eng, s, store = _session(tmp_path, inspect=None)
    conv = Conversation()
    _, reply = _reply(s, conv, conv.add(None, "user", "go").id)
    assert eng.asked == RUN_CARD_DETAIL
    assert s.token_record(conv, reply.id) is None and store.token_records([reply.id]) == {}


def test_post_settings_probabilities_on_request_are_marked_so(tmp_path):
    eng, s, store = _session(tmp_path, inspect=TokenDetail(alternatives=3, final=True))
    conv = Conversation()
    _, reply = _reply(s, conv, conv.add(None, "user", "go").id)
    assert eng.asked == TokenDetail(logprob=True, entropy=True, alternatives=3, final=True)  # + the run card's
    assert store.token_records([reply.id])[reply.id]["distribution"] == "final"


def test_a_continued_reply_extends_its_record(tmp_path):
    eng, s, store = _session(tmp_path, ["alpha beta gamma delta", " epsilon zeta"],
                             entry=fake_entry(generation={"max_new_tokens": 3}))
    conv = Conversation()
    u = conv.add(None, "user", "go")
    _reply(s, conv, u.id)
    reply = conv.get(conv.current_leaf)
    s._records.clear()  # as after a restart: the first part comes from the store
    _reply(s, conv, u.id, continue_from=reply.id)
    record = store.token_records([reply.id])[reply.id]
    assert record["ids"] == reply.token_ids and "".join(record["text"]) == reply.content


def test_export_and_import_keep_the_records_under_the_new_ids(tmp_path):
    eng, s, store = _session(tmp_path)
    conv = Conversation()
    _, reply = _reply(s, conv, conv.add(None, "user", "go").id)
    text = export.to_json(conv, store.token_records(list(conv.messages)))
    assert json.loads(text)["token_details"][reply.id]["ids"] == reply.token_ids
    stored = export.import_json(text, store)  # the ids are taken: the import gets fresh ones
    assert stored.id != conv.id and reply.id not in stored.messages
    twin = next(m for m in stored.messages.values() if m.role == "assistant")
    assert store.token_records([twin.id])[twin.id] == store.token_records([reply.id])[reply.id]
    with Store(tmp_path / "other.sqlite3") as other:  # into a fresh store: the same ids
        assert export.import_json(text, other).id == conv.id
        assert other.token_records([reply.id])[reply.id]["ids"] == reply.token_ids
    assert "token_details" not in json.loads(export.to_json(conv))


def test_records_follow_their_own_reply_when_an_export_repeats_creation_times(tmp_path):
    # A hand-written export may give two replies one timestamp: records are re-keyed by id, never by time.
    eng, s, store = _session(tmp_path, replies=("alpha beta", "gamma delta epsilon"))
    conv = Conversation()
    u = conv.add(None, "user", "go")
    _, first = _reply(s, conv, u.id)
    _, second = _reply(s, conv, u.id)
    data = json.loads(export.to_json(conv, store.token_records(list(conv.messages))))
    messages = data["conversation"]["messages"]
    for m in messages:
        m["created_at"] = messages[0]["created_at"]
    stored = export.import_json(json.dumps(data), store)  # ids taken: fresh ones
    for old in (first, second):
        twin = next(m for m in stored.messages.values() if m.content == old.content)
        assert twin.id != old.id
        assert "".join(store.token_records([twin.id])[twin.id]["text"]) == old.content


@pytest.mark.parametrize("change, says", [
    (lambda d, mid: d.__setitem__("token_details", []), "must map message ids"),
    (lambda d, mid: d["token_details"].__setitem__("nope", d["token_details"][mid]), "not a reply"),
    (lambda d, mid: d["token_details"][mid]["ids"].pop(), "all of one length"),
    (lambda d, mid: d["token_details"][mid]["logprob"].__setitem__(0, 0.5), "log-probability above 0"),
    (lambda d, mid: d["token_details"][mid]["alternatives"].__setitem__(0, [[1]]), "alternatives"),
    (lambda d, mid: d["token_details"][mid].__setitem__("distribution", "cooked"), "distribution"),
])
def test_a_broken_record_in_an_export_is_a_clear_error(tmp_path, change, says):
    eng, s, store = _session(tmp_path)
    conv = Conversation()
    _, reply = _reply(s, conv, conv.add(None, "user", "go").id)
    data = json.loads(export.to_json(conv, store.token_records([reply.id])))
    change(data, reply.id)
    with pytest.raises(ValueError, match=says):
        export.from_json(json.dumps(data))


def test_a_version_2_file_gains_the_table(tmp_path):
    path = tmp_path / "old.sqlite3"
    with Store(path) as s:
        conv = Conversation()
        conv.add(conv.add(None, "user", "hi").id, "assistant", "yo", token_ids=[1])
        s.save(conv)
    raw = sqlite3.connect(path)  # back to what version 2 wrote
    raw.execute("DROP TABLE token_details")
    raw.execute("DELETE FROM schema_version WHERE version = 3")
    raw.commit()
    raw.close()
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION == 3
        reply = next(m for m in s.load(conv.id).messages.values() if m.role == "assistant")
        s.save_token_record(reply.id, {"distribution": "raw", "ids": [1], "text": ["yo"], "logprob": [-0.1],
                                       "entropy": [1.0], "alternatives": [[[1, -0.1]]], "steps": [None]})
        assert s.token_records([reply.id])[reply.id]["text"] == ["yo"]

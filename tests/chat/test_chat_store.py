"""The SQLite store: round trips, search, presets, migrations, damaged/newer files, atomic writes."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.store import SCHEMA_VERSION, Store, StoreError, StoreUnavailable
from chatapp.locations import database_path

REPO = Path(__file__).resolve().parents[2]

# The schema as released in version 1, frozen here: the migration test builds a v1 file from it.
V1_SQL = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL);
CREATE TABLE chats (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, model_id TEXT, system_prompt TEXT,
    settings TEXT NOT NULL DEFAULT '{}', controls TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL, updated_at REAL NOT NULL, current_leaf TEXT);
CREATE TABLE messages (
    id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL, created_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'stopped', 'error', 'streaming')),
    run TEXT NOT NULL DEFAULT '{}', token_ids TEXT);
CREATE INDEX messages_by_chat ON messages(chat_id, created_at);
INSERT INTO schema_version VALUES (1, 'chats and message trees', 1790000000.0);
INSERT INTO chats VALUES ('c1', 'Old chat', 'axiom', NULL, '{"temperature": 0.3}', '{}', 1790000000.0,
                          1790000100.0, 'm2');
INSERT INTO messages VALUES ('m1', 'c1', NULL, 'user', 'hello from v1', 1790000001.0, 'ok', '{}', NULL);
INSERT INTO messages VALUES ('m2', 'c1', 'm1', 'assistant', 'hi!', 1790000002.0, 'ok',
                             '{"model_id": "axiom", "seed": 7, "stop_reason": "eos"}', '[10, 11, 12]');
"""


def sample(title: str = "Cats", reply: str = "Cats purr.") -> Conversation:
    c = Conversation(model_id="fake", system_prompt="Be brief.", settings={"temperature": 0.2},
                     controls={"num_steps": 4})
    u = c.add(None, "user", f"Tell me about {title.lower()}")
    c.add(u.id, "assistant", reply, run={"model_id": "fake", "seed": 1, "steps": [3, 4]}, token_ids=[1, 2, 3])
    c.edit(u.id, "Tell me more")
    c.title = title
    return c


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def test_default_location_is_the_data_dir():
    with Store() as s:
        assert s.path == database_path()
        assert s.schema_version == SCHEMA_VERSION


def test_round_trip_keeps_the_whole_tree(store):
    c = sample()
    store.save(c)
    back = store.load(c.id)
    assert back.to_dict() == c.to_dict()
    with pytest.raises(KeyError):
        store.load("missing")


def test_save_removes_deleted_messages_and_foreign_keys_cascade(store):
    c = sample()
    store.save(c)
    root = c.roots()[0]
    c.delete(c.children(root.id)[0].id)
    store.save(c)
    assert set(store.load(c.id).messages) == set(c.messages)
    store.delete(c.id)
    assert store.list_chats() == []
    raw = sqlite3.connect(store.path)
    assert raw.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_list_and_search_by_title_and_content(store):
    a, b = sample("Cats", "They purr loudly."), sample("Dogs", "Dogs bark; 100% loyal.")
    store.save(a)
    time.sleep(0.01)
    b.touch()
    store.save(b)
    assert [s.title for s in store.list_chats()] == ["Dogs", "Cats"]
    assert [s.message_count for s in store.list_chats()] == [3, 3]
    assert [s.title for s in store.list_chats("cat")] == ["Cats"]         # title, any case
    hits = store.list_chats("PURR")
    assert [s.title for s in hits] == ["Cats"] and "purr" in hits[0].snippet
    assert [s.title for s in store.list_chats("100%")] == ["Dogs"]        # LIKE wildcards are literal
    assert store.list_chats("0%") and not store.list_chats("_0")
    assert store.list_chats("nothing like this") == []


def test_recent_prompts_for_composer_recall(store):
    a = Conversation()
    u = a.add(None, "user", "first question", created_at=10.0)
    a.add(u.id, "assistant", "an answer", created_at=11.0)
    a.add(u.id, "user", "second question", created_at=12.0)
    b = Conversation()
    b.add(None, "user", "first question", created_at=20.0)  # asked again later
    b.add(None, "user", "third question", created_at=21.0)
    store.save(a)
    store.save(b)
    assert store.recent_prompts() == ["second question", "first question", "third question"]
    assert store.recent_prompts(limit=2) == ["first question", "third question"]


def test_rename(store):
    c = sample()
    store.save(c)
    store.rename(c.id, "  Felines ")
    assert store.load(c.id).title == "Felines"
    with pytest.raises(ValueError):
        store.rename(c.id, "   ")
    with pytest.raises(KeyError):
        store.rename("missing", "x")


def test_save_message_is_incremental_and_needs_its_chat(store):
    c = sample()
    store.save(c)
    leaf = c.get(c.current_leaf)
    reply = c.add(leaf.id, "assistant", "partial", status="streaming", token_ids=[])
    store.save_message(c.id, reply, current_leaf=reply.id)
    reply.content += " and more"
    reply.status = "ok"
    store.save_message(c.id, reply)
    back = store.load(c.id)
    assert back.get(reply.id).content == "partial and more" and back.get(reply.id).status == "ok"
    assert back.current_leaf == reply.id
    with pytest.raises(KeyError):
        store.save_message("missing", reply)


def test_a_message_id_cannot_move_between_chats(store):
    c = sample()
    store.save(c)
    twin = Conversation.from_dict({**c.to_dict(), "id": "other"})
    with pytest.raises(StoreError, match="clone"):
        store.save(twin)
    store.save(c.clone())
    assert len(store.list_chats()) == 2


def test_presets_and_settings(store):
    assert store.list_presets() == {}
    store.save_preset("precise", {"temperature": 0.0, "max_new_tokens": 64})
    store.save_preset("creative", {"temperature": 1.1})
    store.save_preset("creative", {"temperature": 1.2, "top_p": 0.9})
    assert store.list_presets() == {"creative": {"temperature": 1.2, "top_p": 0.9},
                                    "precise": {"temperature": 0.0, "max_new_tokens": 64}}
    with pytest.raises(ValueError, match="top_p"):
        store.save_preset("bad", {"top_p": 0})
    with pytest.raises(ValueError, match="unknown"):
        store.save_preset("bad", {"temprature": 1})
    store.delete_preset("precise")
    assert list(store.list_presets()) == ["creative"]
    assert store.get_setting("theme", "default") == "default"
    store.set_setting("theme", "nord")
    store.set_setting("recent", ["a", "b"])
    assert store.get_setting("theme") == "nord" and store.get_setting("recent") == ["a", "b"]


def test_migrates_a_v1_database_and_keeps_a_backup(tmp_path):
    path = tmp_path / "chats.sqlite3"
    raw = sqlite3.connect(path)
    raw.executescript(V1_SQL)
    raw.commit()
    raw.close()
    before = path.read_bytes()
    with Store(path) as s:
        assert s.schema_version == SCHEMA_VERSION
        c = s.load("c1")
        assert [m.content for m in c.path()] == ["hello from v1", "hi!"]
        assert c.get("m2").token_ids == [10, 11, 12] and c.get("m2").run["seed"] == 7
        assert c.settings == {"temperature": 0.3}
        s.save_preset("p", {"temperature": 0.5})  # a v2 table
        assert s.list_chats("v1")[0].id == "c1"
    backups = list(tmp_path.glob("chats.sqlite3.pre-v*.bak"))
    assert len(backups) == 1 and backups[0].read_bytes() == before
    with Store(path) as s:  # opening again is a no-op
        assert s.schema_version == SCHEMA_VERSION
    assert len(list(tmp_path.glob("*.bak"))) == 1


def test_a_damaged_file_is_copied_and_reported(tmp_path):
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"this is not a database at all" * 200)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="damaged") as err:
        Store(path)
    assert err.value.backup is not None and err.value.backup.read_bytes() == before
    assert str(err.value.backup) in str(err.value)
    assert path.read_bytes() == before  # nothing overwritten


def test_a_damaged_page_is_found_at_open(tmp_path):
    path = tmp_path / "chats.sqlite3"
    with Store(path) as s:
        for i in range(40):
            s.save(sample(f"Chat {i}", "x" * 3000))
    data = bytearray(path.read_bytes())
    page = 4096
    # Scribble over a b-tree page in the middle of the file (the header page stays intact).
    data[page * 5: page * 5 + 200] = b"\xff" * 200
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged") as err:
        Store(path)
    assert err.value.backup.read_bytes() == bytes(data)


def test_a_foreign_sqlite_file_is_not_touched(tmp_path):
    path = tmp_path / "chats.sqlite3"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE notes (x TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="not a smollchat database"):
        Store(path)


def test_a_newer_schema_is_refused_with_a_backup(tmp_path):
    path = tmp_path / "chats.sqlite3"
    with Store(path) as s:
        s.save(sample())
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)", (SCHEMA_VERSION + 7,))
    raw.commit()
    raw.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer smollchat") as err:
        Store(path)
    assert err.value.backup.read_bytes() == before and path.read_bytes() == before


def test_a_failed_write_leaves_the_last_saved_state(store):
    c = sample()
    store.save(c)
    saved = store.load(c.id).to_dict()
    c.title = "Changed"
    leaf = c.current_leaf
    c.add(leaf, "assistant", "fine")
    # A value JSON cannot hold fails the write halfway through its transaction.
    c.add(leaf, "assistant", "broken", run={"bad": object()})
    with pytest.raises(TypeError):
        store.save(c)
    assert store.load(c.id).to_dict() == saved
    assert store.list_chats()[0].title == "Cats"
    c.get(c.current_leaf).run = {}
    store.save(c)  # the store is still usable
    assert store.load(c.id).title == "Changed"


def test_a_failure_inside_an_open_transaction_rolls_everything_back(store):
    c = sample()
    store.save(c)
    with pytest.raises(RuntimeError):
        with store._tx() as conn:
            conn.execute("UPDATE chats SET title = 'half-written'")
            conn.execute("DELETE FROM messages")
            raise RuntimeError("killed here")
    assert store.load(c.id).to_dict() == c.to_dict()


_WRITER = r"""
import sys
from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store
s = Store(sys.argv[1])
c = Conversation(id="live")
parent = c.add(None, "user", "go").id
s.save(c)
i = 0
while True:
    m = c.add(parent, "assistant", "reply %d " % i + "x" * 2000, status="streaming")
    s.save_message(c.id, m, current_leaf=m.id)
    print(i, flush=True)
    parent = m.id
    i += 1
"""


def test_a_killed_writer_loses_nothing_it_reported_saved(tmp_path):
    path = tmp_path / "chats.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    saved = -1
    try:
        for line in proc.stdout:
            saved = int(line)
            if saved >= 30:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert saved >= 30
    with Store(path) as s:
        c = s.load("live")
    contents = [m.content.split(" x")[0] for m in c.path()]
    assert contents[0] == "go"
    assert len(contents) - 1 >= saved + 1
    assert contents[1:saved + 2] == [f"reply {i}" for i in range(saved + 1)]


def test_threads_share_one_store(store):
    c = sample()
    store.save(c)
    reply = c.add(c.current_leaf, "assistant", "", status="streaming")
    errors = []

    def writer():
        try:
            for i in range(50):
                reply.content += f"{i} "
                store.save_message(c.id, reply)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():
        store.list_chats("tell")
    t.join()
    assert not errors
    assert store.load(c.id).get(reply.id).content.endswith("49 ")


def test_run_cards_and_token_ids_survive_as_json(store):
    c = sample()
    store.save(c)
    raw = sqlite3.connect(store.path)
    run, ids = raw.execute("SELECT run, token_ids FROM messages WHERE role = 'assistant' AND token_ids IS NOT NULL"
                           ).fetchone()
    assert json.loads(run)["steps"] == [3, 4] and json.loads(ids) == [1, 2, 3]
    assert raw.execute("PRAGMA foreign_key_list(messages)").fetchall()


def test_a_database_locked_by_another_program_is_not_called_damaged(tmp_path):
    path = tmp_path / "chats.sqlite3"
    with Store(path) as s:
        s.save(sample())
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    # WAL: a second program writing does not keep this one from opening and reading.
    with Store(path, timeout=0.1) as s:
        assert [x.title for x in s.list_chats()] == ["Cats"]
        c = sample("Birds")
        with pytest.raises(StoreUnavailable, match="could not be written: it is locked by another program") as err:
            s.save(c)
        assert err.value.reason == "locked" and err.value.pending == (c.id,) and err.value.backup is None
        assert s.load(c.id).title == "Birds"  # the unsaved chat is still there for this process
        other.execute("ROLLBACK")
        s.retry()
        assert [x.title for x in s.list_chats()].count("Birds") == 1 and s.pending == []
    assert not list(tmp_path.glob("*.bak"))


# Faults: the file read-only, deleted, full or shared; rows damaged by hand; replies cut off by a kill.
def _reply(c: Conversation, text: str = "a reply"):
    return c.add(c.current_leaf, "assistant", text, status="streaming")


def test_a_full_disk_keeps_the_message_and_saves_it_on_retry(store):
    c = sample()
    store.save(c)
    # SQLite answers SQLITE_FULL exactly as on a full disk once the file may not grow.
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")
    reply = _reply(c, "x" * 200_000)
    with pytest.raises(StoreUnavailable, match="the disk is full") as err:
        store.save_message(c.id, reply, current_leaf=reply.id)
    assert err.value.reason == "full" and store.pending == [c.id]
    assert store.load(c.id).get(reply.id).content == reply.content  # this process still sees it
    assert len(store.list_chats()) == 1  # reads keep working
    reply.content += " and more"  # the pending row is a snapshot: the retry saves what was kept
    store.retry()  # space back: the retry reconnects (the page limit belonged to the old connection)
    assert store.pending == []
    with Store(store.path) as other:
        assert other.load(c.id).get(reply.id).content == "x" * 200_000


def test_a_read_only_database_keeps_the_message_until_it_is_writable(store):
    c = sample()
    store.save(c)
    # As the store would find a file it may only read (chmod means nothing to root, so open it read-only).
    store._conn = sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, isolation_level=None,
                                  check_same_thread=False)
    reply = _reply(c)
    with pytest.raises(StoreUnavailable, match="read-only") as err:
        store.save_message(c.id, reply, current_leaf=reply.id)
    assert err.value.reason == "read-only" and err.value.pending == (c.id,)
    reply.status = "ok"
    store.save_message(c.id, reply, current_leaf=reply.id)  # the next write reconnects and saves both
    with Store(store.path) as other:
        back = other.load(c.id)
        assert back.get(reply.id).status == "ok" and back.current_leaf == reply.id


@pytest.mark.parametrize("delete", ["the file", "the file and its log"])
def test_a_database_deleted_while_open_is_written_back_with_everything(tmp_path, delete):
    path = tmp_path / "chats.sqlite3"
    with Store(path) as store:
        old = sample("Old chat")
        store.save(old)
        c = sample()
        store.save(c)
        for f in [path] if delete == "the file" else list(tmp_path.iterdir()):
            f.unlink()
        reply = _reply(c)
        reply.status = "ok"
        with pytest.raises(StoreUnavailable, match="deleted while smollchat had it open") as err:
            store.save_message(c.id, reply, current_leaf=reply.id)
        assert err.value.reason == "vanished"
        store.retry()
        assert path.exists()
    with Store(path) as store:
        assert sorted(x.title for x in store.list_chats()) == ["Cats", "Old chat"]
        assert store.load(c.id).to_dict() == c.to_dict() | {"updated_at": store.load(c.id).updated_at}


def test_a_second_program_on_the_deleted_file_is_not_overwritten(tmp_path):
    path = tmp_path / "chats.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with Store(path) as store:
        c = sample()
        store.save(c)
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from chatapp.chat.store import Store; "
                                   "s = Store(sys.argv[1]); s.list_chats(); print('open', flush=True); "
                                   "sys.stdin.read()", str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert holder.stdout.readline().strip() == "open"
            path.unlink()
            reply = _reply(c)
            for _ in range(2):  # the first write reports the deletion, the second tries to restore
                with pytest.raises(StoreUnavailable, match="deleted") as err:
                    store.save_message(c.id, reply)
            assert "another program still has the deleted file open" in str(err.value)
            assert store.load(c.id).get(reply.id).content == "a reply"
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
        store.retry()  # the other program is gone: now the file is written back
    with Store(path) as store:
        assert store.load(c.id).get(reply.id).content == "a reply"
    assert not list(tmp_path.glob("*.restoring*"))  # the temporary home left nothing behind


def test_two_programs_write_the_same_database_at_once(tmp_path):
    path = tmp_path / "chats.sqlite3"
    Store(path).close()
    writer = r"""
import sys
from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store
s = Store(sys.argv[1])
c = Conversation(id=sys.argv[2])
parent = c.add(None, "user", "go").id
s.save(c)
for i in range(150):
    m = c.add(parent, "assistant", "r%d" % i, status="streaming")
    s.save_message(c.id, m, current_leaf=m.id)
    s.list_chats()
    parent = m.id
s.close()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), name], env=env, stderr=subprocess.PIPE,
                              text=True) for name in ("one", "two")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with Store(path) as s:
        for name in ("one", "two"):
            assert [m.content for m in s.load(name).path()] == ["go"] + [f"r{i}" for i in range(150)]
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_reply_streaming_when_killed_reopens_as_stopped(tmp_path):
    path = tmp_path / "chats.sqlite3"
    s = Store(path)
    c = sample()
    reply = _reply(c, "half a rep")
    s.save(c)
    assert s.load(c.id).get(reply.id).status == "streaming"  # this store is still writing it
    s._conn.close()  # as a kill leaves it: no further save
    with Store(path) as s:
        back = s.load(c.id).get(reply.id)
        assert back.status == "stopped" and back.stop_reason == "interrupted" and back.can_continue
        assert back.content == "half a rep"
        raw = sqlite3.connect(path).execute("SELECT status FROM messages WHERE id = ?", (reply.id,)).fetchone()
        assert raw == ("stopped",)  # fixed in the file at open, not only in what load shows


def test_a_damaged_database_is_copied_once_per_damage(tmp_path):
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"this is not a database at all" * 200)
    backups = set()
    for _ in range(3):  # every start meets the same damage
        with pytest.raises(StoreError, match="damaged") as err:
            Store(path)
        backups.add(err.value.backup)
    assert len(backups) == 1 and len(list(tmp_path.glob("*.bak"))) == 1
    path.write_bytes(b"damaged differently" * 300)
    with pytest.raises(StoreError, match="damaged") as err:
        Store(path)
    assert err.value.backup not in backups and len(list(tmp_path.glob("*.bak"))) == 2


def _edit_rows(path: Path, *statements: tuple[str, tuple]) -> None:
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("PRAGMA ignore_check_constraints = ON")  # as a hand edit with another tool can
    for sql, args in statements:
        raw.execute(sql, args)
    raw.close()


def test_damaged_rows_are_repaired_or_skipped_with_reasons(tmp_path):
    path = tmp_path / "chats.sqlite3"
    c = Conversation(id="c")
    u = c.add(None, "user", "hi", id="u")
    a = c.add(u.id, "assistant", "hello", id="a", run={"timings": {"decode_tok_s": 30.0}}, token_ids=[1, 2])
    gone = c.add(a.id, "user", "lost", id="gone")
    c.add(gone.id, "assistant", "orphan", id="child")
    with Store(path) as s:
        s.save(c)
    deep = "[" * 100_000 + "]" * 100_000
    _edit_rows(path,
               ("UPDATE messages SET run = ? WHERE id = 'a'", ('{"timings": {"decode_tok_s": "fast"}, "seed": 3}',)),
               ("UPDATE messages SET token_ids = ? WHERE id = 'a'", (deep,)),
               ("UPDATE messages SET created_at = 'yesterday' WHERE id = 'u'", ()),
               ("UPDATE messages SET role = 'robot' WHERE id = 'gone'", ()),
               ("UPDATE messages SET content = CAST(X'68C3' AS TEXT) WHERE id = 'child'", ()),  # bad UTF-8
               ("UPDATE chats SET settings = '{\"temperature\": \"hot\", \"top_k\": 5}' WHERE id = 'c'", ()))
    with Store(path) as s:
        for _ in range(2):  # opening it again meets the same rows: never a crash
            back = s.load("c")
            assert back.get("a").run == {"seed": 3} and back.get("a").token_ids is None
            assert back.get("u").created_at == 0.0 and "gone" not in back.messages
            assert back.get("child").parent_id == "a"  # the skipped message's reply moves up
            assert back.get("child").content == "h\ufffd"
            assert back.settings == {"top_k": 5}
            text = "\n".join(back.repairs)
            for why in ("decode_tok_s", "token_ids", "created_at", "skipped message", "robot", "temperature"):
                assert why in text
        s.save(back)  # saving the repaired chat writes rows that read back clean
        assert s.load("c").repairs == []
        assert [m.id for m in s.load("c").path()] == ["u", "a", "child"]


def test_damaged_preset_and_setting_rows_read_as_missing(store):
    store.save_preset("good", {"temperature": 0.1})
    store.set_setting("theme", "dark")
    _edit_rows(store.path, ("INSERT INTO presets VALUES ('bad', '{broken', 0)", ()),
               ("UPDATE app_settings SET value = '[[[' WHERE key = 'theme'", ()))
    assert store.list_presets() == {"good": {"temperature": 0.1}} and store.get_preset("bad") is None
    assert store.get_setting("theme", "light") == "light"


def test_importing_a_chat_with_taken_ids_and_title(store):
    from chatapp.chat.export import from_json, to_json

    c = sample()
    store.save(c)
    text = to_json(c)
    first = store.import_chat(from_json(text))
    second = store.import_chat(from_json(text))
    assert [first.title, second.title] == ["Cats (imported)", "Cats (imported 2)"]
    ids = [set(x.messages) | {x.id} for x in (c, first, second)]
    assert not ids[0] & ids[1] and not ids[1] & ids[2] and not ids[0] & ids[2]
    # Message ids taken by another chat (not the chat id) also get fresh ones.
    other = Conversation.from_dict({**c.to_dict(), "id": "another", "title": "Dogs"})
    third = store.import_chat(other)
    assert third.title == "Dogs" and not set(third.messages) & set(c.messages)
    assert any("fresh" in r for r in third.repairs)
    assert len(store.list_chats()) == 4
    for x in (c, first, second, third):
        assert [m.content for m in store.load(x.id).path()] == [m.content for m in c.path()]


def test_the_tiny_disk_of_a_tmpfs_fills_and_frees(tmp_path):
    """A real full disk, where mounting a tmpfs is allowed (root in a container); skipped elsewhere."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with Store(mnt / "chats.sqlite3") as store:
            c = sample()
            store.save(c)
            (mnt / "filler").write_bytes(b"\0" * (os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize))
            reply = _reply(c, "y" * 300_000)
            with pytest.raises(StoreUnavailable, match="full") as err:
                store.save_message(c.id, reply, current_leaf=reply.id)
            assert err.value.reason == "full" and store.load(c.id).get(reply.id).content == reply.content
            (mnt / "filler").unlink()
            store.retry()
            assert store.pending == []
            reply.content = "short now"
            store.save_message(c.id, reply)
        with Store(mnt / "chats.sqlite3") as store:
            assert store.load(c.id).get(reply.id).content == "short now"
            assert store._conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_saving_a_long_chat_again_rewrites_only_what_changed(store):
    c = sample()
    for i in range(200):
        c.add(c.current_leaf, "user" if i % 2 else "assistant", f"turn {i}", run={"tokens": {"logprob": [-0.1] * 64}})
    store.save(c)
    before = store._conn.total_changes
    c.get(c.current_leaf).content += " (edited)"
    store.save(c)
    assert store._conn.total_changes - before == 2  # the chat row and the one message
    assert store.load(c.id).get(c.current_leaf).content.endswith("(edited)")


def test_closing_writes_what_is_pending_or_says_it_could_not(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store = Store(path)
    c = sample()
    store.save(c)
    store._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    reply = _reply(c)
    with pytest.raises(StoreUnavailable):
        store.save_message(c.id, reply)
    store.close()  # a new connection can write: the pending reply is written on the way out
    with Store(path) as s:
        assert reply.id in s.load(c.id).messages
    store = Store(path)
    c.title = "Renamed"
    store._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    with pytest.raises(StoreUnavailable):
        store.save(c)

    def gone() -> None:
        raise StoreUnavailable("the disk went away", "io")
    store._ready = gone
    with pytest.raises(StoreUnavailable, match="went away"):  # said, not silently dropped
        store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        store._conn.execute("SELECT 1")  # closed all the same


def test_the_rows_remembered_for_cheap_saves_stay_bounded(store):
    from chatapp.chat.store import WRITTEN_CHATS

    chats = [sample(f"Chat {i}") for i in range(WRITTEN_CHATS + 3)]
    for c in chats:
        store.save(c)
    assert list(store._written) == [c.id for c in chats[-WRITTEN_CHATS:]]
    first = chats[0]
    first.title = "Back again"
    store.save(first)  # forgotten rows: written whole, and right
    assert store.load(first.id).to_dict() == first.to_dict()

"""Saved chats in SQLite (stdlib sqlite3): versioned migrations, foreign keys, one transaction per write.

The schema version lives in a `schema_version` table (one row per applied migration). Opening a
database from an older version upgrades it in place after copying the file to a timestamped
backup; a damaged database, or one written by a newer smollchat, raises `StoreError` after the same
copy, and the original file is left untouched. Every write is a single transaction, so a crash or a
kill mid-write leaves the last committed state: nothing already saved is lost.

One connection serves all threads (the TUI reads on its UI thread while the generation worker saves
the streaming reply); a lock serialises access. The file is in WAL mode with a busy timeout, so a
second smollchat on the same database reads freely and waits its turn to write.

Nothing being saved is lost when the database cannot be written (read-only, deleted while open, a
full disk, locked too long): the write raises `StoreUnavailable`, its rows stay in memory (`pending`,
shown by `load`), and `retry()` or the next write saves them once the file is usable again. Rows read
back go through the same validator as an import (`Conversation.from_dict(repair=True)`): a damaged or
hand-edited row is fixed or skipped, with the reasons in `Conversation.repairs`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..contract import SamplingSettings
from .conversation import DEFAULT_TITLE, Conversation, Message, parse_json
from .presets import SUFFIX, is_builtin
from .schema import MIGRATIONS, SCHEMA_VERSION


class StoreError(RuntimeError):
    """The database cannot be used; the message says why and where the backup copy is.

    Attributes:
        backup: the copy made before giving up (None when nothing was copied).
    """

    def __init__(self, message: str, backup: Path | None = None) -> None:
        super().__init__(message)
        self.backup = backup


class StoreUnavailable(StoreError):
    """The database cannot be written right now; what was being saved is kept in memory.

    Show the message, mark the affected message as not saved, and offer `Store.retry()` (any later
    write retries too). The store keeps working once the cause is gone.

    Attributes:
        reason: "read-only" | "vanished" (the file was deleted while open) | "full" (the disk) |
            "locked" (another program held it past the busy timeout) | "io" (any other I/O failure).
        pending: ids of the chats whose changes are waiting in memory.
    """

    def __init__(self, message: str, reason: str, pending: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason = reason
        self.pending = pending


@dataclass(frozen=True)
class ChatSummary:
    """One row of the chat list."""

    id: str
    title: str
    model_id: str | None
    created_at: float
    updated_at: float
    message_count: int
    #: For a search: a short excerpt around the first match in the chat's messages ("" if the title matched).
    snippet: str = ""


#: SQLite primary result codes: SQLITE_CORRUPT, SQLITE_NOTADB (a damaged file); SQLITE_BUSY, SQLITE_LOCKED.
_CORRUPT = (11, 26)
_BUSY = (5, 6)
#: Codes after which the file may be usable again later: READONLY, IOERR, FULL, CANTOPEN, PERM, AUTH.
_UNAVAILABLE = {8: "read-only", 10: "io", 13: "full", 14: "io", 3: "io", 23: "io"}
_WHY = {"read-only": "it is read-only", "vanished": "the file was deleted while smollchat had it open",
        "full": "the disk is full", "locked": "it is locked by another program (is another smollchat running?)",
        "io": "the file cannot be reached"}

#: Chats whose written rows the store remembers (to rewrite only what changed); the rows of a long chat
#: take megabytes, so only the chats saved lately are kept.
WRITTEN_CHATS = 4

_CHAT_COLUMNS = ("id", "title", "model_id", "system_prompt", "settings", "controls", "created_at", "updated_at",
                 "current_leaf")
_MESSAGE_COLUMNS = ("id", "chat_id", "parent_id", "role", "content", "created_at", "status", "run", "token_ids")


@dataclass
class _Pending:
    """One chat's writes not yet committed, as ready-made rows (snapshots: the caller keeps editing)."""

    chat: tuple | None = None  # the chats row of a whole-chat save
    keep: set[str] | None = None  # with it: the tree's message ids (stored ones outside it are deleted)
    messages: dict[str, tuple] = field(default_factory=dict)  # message rows, parents before children
    leaf: str | None = None
    touched: float | None = None

    def copy(self) -> "_Pending":
        return _Pending(self.chat, None if self.keep is None else set(self.keep), dict(self.messages),
                        self.leaf, self.touched)


class Store:
    """The chat database. `Store()` opens `locations.database_path()`; `Store(":memory:")` keeps nothing."""

    def __init__(self, path: Path | str | None = None, *, timeout: float = 10.0) -> None:
        if path is None:
            from ..locations import database_path
            path = database_path()
        self._memory = str(path) == ":memory:"
        self.path = Path(path)
        self._timeout = timeout
        self._lock = threading.RLock()
        self._pending: dict[str, _Pending] = {}
        # Message rows as this store last committed them, by chat: a whole-chat save rewrites only the rows
        # that changed (the session saves the chat at every turn; rewriting thousands of rows took seconds).
        self._written: OrderedDict[str, dict[str, tuple]] = OrderedDict()  # the WRITTEN_CHATS latest
        self._streaming: set[str] = set()  # replies this store last saved as streaming
        self._broken: str | None = None  # why the last write failed: reconnect before the next one
        try:
            if not self._memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            existed = not self._memory and self.path.exists() and self.path.stat().st_size > 0
        except OSError as e:
            raise StoreUnavailable(f"The chat database {self.path} cannot be opened: {e.strerror or e}.",
                                   "io") from None
        self._conn = self._connect(check=existed, migrate=True)
        self._settle_interrupted()

    # Opening.
    def _connect(self, *, check: bool, migrate: bool) -> sqlite3.Connection:
        """Open the file (integrity first, so a damaged file is copied before anything touches it)."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=self._timeout)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"The chat database {self.path} cannot be opened: {e}.", "io") from None
        # Text that is not UTF-8 (a hand-edited row) is read with replacement signs instead of failing the read.
        conn.text_factory = lambda b: b.decode("utf-8", "replace")
        self._conn, self._ident = conn, self._file_ident()
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if check:
                self._check_integrity()
            if migrate:
                self._migrate(check)
            elif self._version() != SCHEMA_VERSION:
                raise StoreUnavailable(f"The chat database {self.path} was replaced by another file; move it away "
                                       "and retry.", "io")
            try:
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                pass  # a read-only file keeps its journal mode; writes report read-only when tried
        except StoreError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise self._error(e, "opened") from None
        return conn

    def _file_ident(self) -> tuple[int, int] | None:
        if self._memory:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _settle_interrupted(self) -> None:
        """Replies still marked streaming were cut off by a crash or a kill: mark them stopped.

        Best effort: a read-only or busy file is left alone (`load` shows such replies as stopped anyway),
        and a second smollchat still streaming one rewrites its status with its next save."""
        try:
            with self._tx() as conn:
                conn.execute("""UPDATE messages SET status = 'stopped', run = json_set(
                    CASE WHEN json_valid(run) THEN CASE WHEN json_type(run) = 'object' THEN run ELSE '{}' END
                         ELSE '{}' END, '$.stop_reason', 'interrupted', '$.interrupted', json('true'))
                    WHERE status = 'streaming'""")
        except StoreError:
            self._broken = None

    def _check_integrity(self) -> None:
        # A row breaking a CHECK or NOT NULL rule is a hand edit, not a damaged file: load() repairs it.
        rows = [str(r[0]) for r in self._conn.execute("PRAGMA quick_check").fetchall()]
        bad = [r for r in rows if r != "ok" and not r.startswith(("CHECK constraint failed", "NULL value in"))]
        if bad:
            raise self._damaged("; ".join(bad[:3]))

    def _version(self) -> int:
        has = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
        if not has:
            tables = self._conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables:
                raise self._damaged("it has tables but no schema_version table, so it is not a smollchat database")
            return 0
        return self._conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def _migrate(self, existed: bool) -> None:
        version = self._version()
        if version > SCHEMA_VERSION:
            backup = self._backup("newer")
            raise StoreError(
                f"The chat database {self.path} was written by a newer smollchat (schema version {version}; "
                f"this version understands up to {SCHEMA_VERSION}). Nothing was changed; a copy is at {backup}. "
                "Upgrade smollchat to open it, or move the file away to start a new database.", backup)
        if version == SCHEMA_VERSION:
            return
        if existed and version > 0:
            self._backup(f"pre-v{SCHEMA_VERSION}")
        with self._tx() as conn:
            if version == 0:
                conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
                             "applied_at REAL NOT NULL)")
            for m in MIGRATIONS:
                if m.version > version:
                    m.apply(conn)
                    conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (m.version, m.description, time.time()))

    def _backup(self, reason: str) -> Path:
        """Copy the database file (and its journal) aside; return the copy's path.

        The copy is named after the file's size, time and inode, so a file that stays as it was (a
        damaged or newer database met on every start) is copied once, not once per start."""
        sides = [self.path.with_name(self.path.name + suffix) for suffix in ("-journal", "-wal")]
        stamp = hashlib.sha256(repr([(f.name, f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino)
                                     for f in (self.path, *sides) if f.exists()]).encode()).hexdigest()[:12]
        dest = self.path.with_name(f"{self.path.name}.{reason}-{stamp}.bak")
        if dest.exists() and dest.stat().st_size == self.path.stat().st_size:
            return dest
        shutil.copy2(self.path, dest)
        for side in sides:
            if side.exists():
                shutil.copy2(side, dest.with_name(dest.name + side.name[len(self.path.name):]))
        return dest

    def _damaged(self, why: str) -> StoreError:
        try:
            backup: Path | None = self._backup("damaged")
            where = f"A copy of the file is at {backup}."
        except OSError as e:
            backup, where = None, f"Copying it failed too ({e}); the file was left as it is."
        return StoreError(f"The chat database {self.path} is damaged ({why}). {where} Move the damaged file "
                          "away (or restore a backup) and start smollchat again.", backup)

    def _error(self, e: sqlite3.Error, doing: str) -> StoreError:
        """The StoreError for a failed SQLite call: damaged files are copied aside first; a cause that can
        pass (read-only, full, locked, I/O) gives StoreUnavailable."""
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        text = str(e)
        if code in _CORRUPT or (not code and ("malformed" in text or "not a database" in text)):
            return self._damaged(text)
        if code in _BUSY or (not code and "locked" in text):
            reason = "locked"
        elif code in _UNAVAILABLE:
            reason = _UNAVAILABLE[code]
        elif not code and ("readonly" in text or "disk" in text or "unable to open" in text):
            reason = "full" if "full" in text else "read-only" if "readonly" in text else "io"
        else:
            return StoreError(f"The chat database {self.path} could not be {doing}: {e}.")
        return self._unavailable(reason, doing, text)

    def _unavailable(self, reason: str, doing: str, detail: str = "") -> StoreUnavailable:
        if reason != "locked":
            self._broken = reason
        pending = tuple(self._pending)
        kept = (" The unsaved changes are kept in memory: retry when the cause is fixed." if pending else
                " Try again when the cause is fixed.")
        more = f" ({detail})" if detail and detail not in _WHY[reason] else ""
        return StoreUnavailable(f"The chat database {self.path} could not be {doing}: {_WHY[reason]}{more}.{kept}",
                                reason, pending)

    # Recovery: the next write after a failure reconnects, so a file that is usable again is used again.
    def _ready(self) -> None:
        """Make sure the connection writes to the file at `path`; raise StoreUnavailable if it cannot."""
        if self._memory:
            return
        if self._file_ident() != self._ident:
            if self._broken != "vanished":
                raise self._unavailable("vanished", "written", "")
            self._restore_vanished()
        elif self._broken:
            old = self._conn
            try:
                self._connect(check=False, migrate=False)
            except StoreError:
                self._conn = old
                raise
            self._broken = None
            old.close()

    def _restore_vanished(self) -> None:
        """The file was deleted while open: write what this connection still reads back to `path`."""
        if self.path.exists():
            raise self._unavailable("vanished", "written", "another file now stands at its place; move it away "
                                    "to restore the chats this smollchat still holds, or restart smollchat")
        tmp = self.path.with_name(self.path.name + ".restoring")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)  # a leftover, or the file this connection reads (then held open)
            copy = sqlite3.connect(tmp)
            try:
                self._conn.backup(copy)
            finally:
                copy.close()
        except (OSError, sqlite3.Error) as e:
            raise self._unavailable("vanished", "written", f"restoring it failed: {e}") from None
        # The deleted file's -wal/-shm names (SQLite keeps them when the file has moved) must not meet a new
        # file: SQLite would take the old log for the new file's. They go unless another program uses them.
        self._conn.close()
        if not _remove_unused_log(self.path):
            self._conn = sqlite3.connect(tmp, isolation_level=None, check_same_thread=False, timeout=self._timeout)
            self._conn.execute("PRAGMA journal_mode = DELETE")  # no log names of its own to leave behind
            raise self._unavailable("vanished", "written", f"another program still has the deleted file open; the "
                                    f"chats are kept in {tmp} until it closes")
        os.replace(tmp, self.path)
        self._ident, self._broken = self._file_ident(), "io"  # if connecting fails, the next write reconnects
        self._connect(check=False, migrate=False)
        self._broken = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is saved, or none of it."""
        with self._lock:
            self._ready()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                if self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise self._error(e, "written") from None

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                cur = self._conn.execute(sql, args)
                cur.row_factory = sqlite3.Row
                return cur.fetchall()
            except sqlite3.Error as e:
                raise self._error(e, "read") from None

    def close(self) -> None:
        """Close the file, writing what is pending first: StoreUnavailable (once closed) when that fails."""
        with self._lock:
            try:
                self.retry()
            finally:
                self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._version()

    # Writes that wait in memory while the file cannot be written.
    @property
    def pending(self) -> list[str]:
        """Ids of the chats with changes not yet saved (after a StoreUnavailable)."""
        with self._lock:
            return list(self._pending)

    def retry(self) -> None:
        """Write what is pending; StoreUnavailable again if the file still cannot be written."""
        with self._lock:
            if self._pending:
                with self._tx() as conn:
                    self._flush(conn)
                self._flushed()

    def _commit(self, chat_id: str, change: Callable[[_Pending], None]) -> None:
        """Add `change` to the chat's pending rows and write everything pending in one transaction.

        When the file cannot be written the rows stay pending (StoreUnavailable); any other failure
        (bad data, a missing chat) undoes the change and raises."""
        with self._lock:
            before = self._pending.get(chat_id)
            entry = before.copy() if before is not None else _Pending()
            change(entry)
            self._pending[chat_id] = entry
            try:
                with self._tx() as conn:
                    self._flush(conn)
                self._flushed()
            except StoreUnavailable:
                raise
            except BaseException:
                if before is None:
                    self._pending.pop(chat_id, None)
                else:
                    self._pending[chat_id] = before
                raise

    def _flush(self, conn: sqlite3.Connection) -> None:
        for chat_id, p in self._pending.items():
            if p.chat is not None:
                conn.execute(f"""INSERT INTO chats ({', '.join(_CHAT_COLUMNS)}) VALUES ({', '.join('?' * 9)})
                   ON CONFLICT(id) DO UPDATE SET title = excluded.title, model_id = excluded.model_id,
                     system_prompt = excluded.system_prompt, settings = excluded.settings,
                     controls = excluded.controls, updated_at = excluded.updated_at,
                     current_leaf = excluded.current_leaf""", p.chat)
            elif not conn.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone():
                raise KeyError(f"no chat {chat_id!r}: save the conversation before its messages")
            if p.keep is not None:
                stored = {r[0] for r in conn.execute("SELECT id FROM messages WHERE chat_id = ?", (chat_id,))}
                for mid in stored - p.keep:
                    conn.execute("DELETE FROM messages WHERE id = ?", (mid,))
            written = self._written.get(chat_id, {})
            for row in p.messages.values():
                if written.get(row[0]) == row:
                    continue
                owner = conn.execute("SELECT chat_id FROM messages WHERE id = ?", (row[0],)).fetchone()
                if owner is not None and owner[0] != chat_id:
                    raise StoreError(f"message {row[0]} already belongs to chat {owner[0]}; save a copy with fresh "
                                     "ids (Conversation.clone(), or Store.import_chat) instead")
                conn.execute(f"""INSERT INTO messages ({', '.join(_MESSAGE_COLUMNS)}) VALUES ({', '.join('?' * 9)})
                   ON CONFLICT(id) DO UPDATE SET parent_id = excluded.parent_id, role = excluded.role,
                     content = excluded.content, created_at = excluded.created_at, status = excluded.status,
                     run = excluded.run, token_ids = excluded.token_ids""", row)
            if p.touched is not None:
                conn.execute("UPDATE chats SET updated_at = max(updated_at, ?) WHERE id = ?", (p.touched, chat_id))
            if p.leaf is not None:
                conn.execute("UPDATE chats SET current_leaf = ? WHERE id = ?", (p.leaf, chat_id))

    def _flushed(self) -> None:
        """The pending rows are committed: remember them as written."""
        for chat_id, p in self._pending.items():
            written = self._written.setdefault(chat_id, {})
            if p.keep is not None:
                for mid in set(written) - p.keep:
                    del written[mid]
            written.update(p.messages)
            self._written.move_to_end(chat_id)
        while len(self._written) > WRITTEN_CHATS:  # a chat not saved lately is rewritten whole next time
            self._written.popitem(last=False)
        self._pending.clear()

    def _track(self, m: Message) -> None:
        (self._streaming.add if m.status == "streaming" else self._streaming.discard)(m.id)

    # Chats.
    def list_chats(self, query: str | None = None) -> list[ChatSummary]:
        """Chats, most recently updated first; `query` keeps those whose title or messages contain it."""
        count = "(SELECT count(*) FROM messages m WHERE m.chat_id = c.id)"
        if not query or not query.strip():
            rows = self._read(f"SELECT c.*, {count} AS n FROM chats c ORDER BY c.updated_at DESC")
            return [_summary(r) for r in rows]
        pattern = "%" + _escape_like(query.strip()) + "%"
        rows = self._read(
            f"""SELECT c.*, {count} AS n,
                   (SELECT m.content FROM messages m WHERE m.chat_id = c.id AND m.content LIKE ? ESCAPE '\\'
                    ORDER BY m.created_at LIMIT 1) AS hit
                FROM chats c
                WHERE c.title LIKE ? ESCAPE '\\'
                   OR EXISTS (SELECT 1 FROM messages m WHERE m.chat_id = c.id AND m.content LIKE ? ESCAPE '\\')
                ORDER BY c.updated_at DESC""", (pattern, pattern, pattern))
        return [_summary(r, _snippet(r["hit"], query.strip()) if isinstance(r["hit"], str) else "") for r in rows]

    def recent_prompts(self, limit: int = 200) -> list[str]:
        """The user's last `limit` distinct messages over all chats, oldest first (composer recall)."""
        rows = self._read("SELECT content FROM messages WHERE role = 'user' GROUP BY content "
                          "ORDER BY max(created_at) DESC LIMIT ?", (limit,))
        return [r["content"] for r in reversed(rows) if isinstance(r["content"], str)]

    def exists(self, chat_id: str) -> bool:
        with self._lock:
            pending = self._pending.get(chat_id)
            return (pending is not None and pending.chat is not None) or bool(
                self._read("SELECT 1 FROM chats WHERE id = ?", (chat_id,)))

    def load(self, chat_id: str) -> Conversation:
        """The whole chat (with any changes still pending); KeyError when it does not exist.

        Rows are checked like an import; what was fixed or skipped is listed in the result's `repairs`.
        A reply marked streaming that this store is not writing was cut off: it reads as stopped."""
        with self._lock:
            rows = [dict(r) for r in self._read("SELECT * FROM chats WHERE id = ?", (chat_id,))]
            msgs = {r["id"]: dict(r) for r in self._read(
                "SELECT * FROM messages WHERE chat_id = ? ORDER BY created_at, rowid", (chat_id,))}
            pending = self._pending.get(chat_id)
            if pending is not None:
                if pending.chat is not None:
                    rows = [dict(zip(_CHAT_COLUMNS, pending.chat))]
                if pending.keep is not None:
                    msgs = {k: v for k, v in msgs.items() if k in pending.keep}
                msgs.update((k, dict(zip(_MESSAGE_COLUMNS, v))) for k, v in pending.messages.items())
                if rows and pending.leaf is not None:
                    rows[0]["current_leaf"] = pending.leaf
            streaming = set(self._streaming)
        if not rows:
            raise KeyError(f"no chat {chat_id!r} in {self.path}")
        c = rows[0]
        fixes: list[str] = []
        data = {k: c[k] for k in _CHAT_COLUMNS}
        data["settings"] = _column(c, "settings", {}, f"chat {chat_id}", fixes)
        data["controls"] = _column(c, "controls", {}, f"chat {chat_id}", fixes)
        data["messages"] = [_message_dict(m, streaming, fixes) for m in msgs.values()]
        conv = Conversation.from_dict(data, repair=True)
        conv.repairs[:0] = fixes
        if conv.repairs:
            with self._lock:  # the file holds rows other than those written here: rewrite them all next time
                self._written.pop(chat_id, None)
        return conv

    def save(self, conv: Conversation) -> None:
        """Write the whole chat (insert or update; messages no longer in the tree are removed)."""
        chat = (conv.id, conv.title, conv.model_id, conv.system_prompt, json.dumps(conv.settings),
                json.dumps(conv.controls), conv.created_at, conv.updated_at, conv.current_leaf)
        rows = {m.id: _message_row(conv.id, m) for m in _parents_first(conv)}

        def change(p: _Pending) -> None:
            p.chat, p.keep, p.messages, p.leaf, p.touched = chat, set(rows), rows, None, None
        self._commit(conv.id, change)
        for m in conv.messages.values():
            self._track(m)

    def save_message(self, chat_id: str, msg: Message, current_leaf: str | None = None) -> None:
        """Write one message (cheap enough to call while a reply streams); the chat must be saved already."""
        row = _message_row(chat_id, msg)
        now = time.time()

        def change(p: _Pending) -> None:
            p.messages[msg.id] = row
            if p.keep is not None:
                p.keep.add(msg.id)
            if p.chat is not None:
                p.chat = p.chat[:7] + (max(p.chat[7], now), current_leaf or p.chat[8])
            else:
                p.touched = now
                p.leaf = current_leaf or p.leaf
        self._commit(chat_id, change)
        self._track(msg)

    def import_chat(self, conv: Conversation, remap: dict[str, str] | None = None) -> Conversation:
        """Store an imported chat as a new one and return what was stored: fresh ids when its chat id or
        any message id is taken (`remap`, when given, receives old id -> new id), and a title that tells
        it apart from a saved chat of the same name ("Cats (imported)", "Cats (imported 2)", ...)."""
        with self._lock:
            ids = list(conv.messages)
            taken = self.exists(conv.id) or any(
                self._read(f"SELECT 1 FROM messages WHERE id IN ({', '.join('?' * len(part))}) LIMIT 1", tuple(part))
                for part in (ids[i:i + 500] for i in range(0, len(ids), 500)))
            if taken:
                notes = conv.repairs
                conv = conv.clone(remap)
                conv.repairs = [*notes, "its ids were taken by a saved chat, so it was given fresh ones"]
            titles = {r["title"] for r in self._read("SELECT title FROM chats")}
            if conv.title in titles:
                title, n = f"{conv.title} (imported)", 1
                while title in titles:
                    n += 1
                    title = f"{conv.title} (imported {n})"
                conv.title = title
            self.save(conv)
        return conv

    def rename(self, chat_id: str, title: str) -> None:
        title = title.strip()
        if not title:
            raise ValueError("a chat title cannot be empty")
        with self._tx() as conn:
            if conn.execute("UPDATE chats SET title = ?, updated_at = ? WHERE id = ?",
                            (title, time.time(), chat_id)).rowcount == 0:
                raise KeyError(f"no chat {chat_id!r}")

    def delete(self, chat_id: str) -> None:
        """Delete a chat and (by cascade) all its messages (and whatever of it was still pending)."""
        with self._lock:
            self._pending.pop(chat_id, None)
            self._written.pop(chat_id, None)
            with self._tx() as conn:
                conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    # Presets: named sampling settings a chat can refer to (`conv.settings["preset"]`).
    def list_presets(self) -> dict[str, dict[str, Any]]:
        """Every preset by name (sorted); a damaged row is left out."""
        out = {}
        for r in self._read("SELECT * FROM presets ORDER BY name"):
            value = _loads(r["settings"])
            if isinstance(value, dict):
                out[r["name"]] = value
        return out

    def get_preset(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT settings FROM presets WHERE name = ?", (name,))
        value = _loads(rows[0]["settings"]) if rows else None
        return value if isinstance(value, dict) else None

    def save_preset(self, name: str, settings: dict[str, Any]) -> None:
        """Create or replace a preset; the settings must be valid SamplingSettings overrides, the name not
        a built-in's (chat/presets.py)."""
        name = name.strip()
        if not name:
            raise ValueError("a preset needs a name")
        if is_builtin(name):
            raise ValueError(f"“{name}” is a built-in preset's name (they end in “{SUFFIX}”); choose another")
        try:
            SamplingSettings().with_overrides(**settings).validate()
        except TypeError as e:
            raise ValueError(str(e)) from None
        with self._tx() as conn:
            conn.execute("INSERT INTO presets VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                         "settings = excluded.settings, updated_at = excluded.updated_at",
                         (name, json.dumps(settings), time.time()))

    def delete_preset(self, name: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM presets WHERE name = ?", (name,))

    # Per-token records (chat/token_record.py), one per reply.
    def save_token_record(self, message_id: str, record: dict[str, Any]) -> None:
        """Store (or replace) a reply's per-token record; the reply must be saved already."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO token_details VALUES (?, ?)", (message_id, json.dumps(record)))

    def token_records(self, message_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The stored per-token records of these messages, by id (a damaged row is left out)."""
        rows = [r for part in (message_ids[i:i + 500] for i in range(0, len(message_ids), 500)) for r in self._read(
            f"SELECT * FROM token_details WHERE message_id IN ({', '.join('?' * len(part))})", tuple(part))]
        return {r["message_id"]: v for r in rows if isinstance(v := _loads(r["record"]), dict)}

    # App settings (theme, last model, ...): JSON values by key.
    def get_setting(self, key: str, default: Any = None) -> Any:
        """The value, or `default` when it is not set (or its row is damaged)."""
        rows = self._read("SELECT value FROM app_settings WHERE key = ?", (key,))
        value = _loads(rows[0]["value"], _MISSING) if rows else _MISSING
        return default if value is _MISSING else value

    def set_setting(self, key: str, value: Any) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO app_settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, json.dumps(value)))


_MISSING = object()


def _loads(text: Any, default: Any = None) -> Any:
    """A JSON column's value, or `default` when the row holds something else (a hand edit, a damaged row)."""
    try:
        return parse_json(text, "the value") if isinstance(text, str) else default
    except ValueError:
        return default


def _column(row: dict[str, Any], name: str, default: Any, where: str, fixes: list[str]) -> Any:
    value = row[name]
    if value is None and default is None:
        return None
    parsed = _loads(value, _MISSING)
    if parsed is _MISSING:
        fixes.append(f"{where}: the stored {name} is not valid JSON ({_short(value)}; ignored)")
        return default
    return parsed


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _remove_unused_log(path: Path) -> bool:
    """Delete path's -wal and -shm unless a program holds the shared-memory lock SQLite takes while
    it has the database open (the DMS byte, offset 128 of -shm); False when one does."""
    wal, shm = (path.with_name(path.name + x) for x in ("-wal", "-shm"))
    if shm.exists():
        try:
            import fcntl
            with open(shm, "r+b") as f:
                fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
        except (ImportError, OSError):
            return False
    wal.unlink(missing_ok=True)
    shm.unlink(missing_ok=True)
    return True


def _message_row(chat_id: str, m: Message) -> tuple:
    return (m.id, chat_id, m.parent_id, m.role, m.content, m.created_at, m.status, json.dumps(m.run),
            None if m.token_ids is None else json.dumps(m.token_ids))


def _parents_first(conv: Conversation) -> list[Message]:
    """Every message, each after its parent (foreign keys), siblings in creation order."""
    kids: dict[str | None, list[Message]] = {}
    for m in conv.messages.values():
        kids.setdefault(m.parent_id, []).append(m)
    out: list[Message] = []
    todo = [None]
    while todo:
        parent = todo.pop()
        for m in kids.get(parent, []):
            out.append(m)
            todo.append(m.id)
    return out


def _message_dict(r: dict[str, Any], streaming: set[str], fixes: list[str]) -> dict[str, Any]:
    where = f"message {r['id']}"
    d = {k: r[k] for k in _MESSAGE_COLUMNS if k != "chat_id"}
    d["run"] = _column(r, "run", {}, where, fixes)
    d["token_ids"] = _column(r, "token_ids", None, where, fixes)
    if d["status"] == "streaming" and r["id"] not in streaming:
        # Cut off by a crash or kill (or streaming in another smollchat, whose next save says so).
        d["status"] = "stopped"
        if isinstance(d["run"], dict):
            d["run"] = {**d["run"], "stop_reason": "interrupted", "interrupted": True}
    return d


def _summary(r: sqlite3.Row, snippet: str = "") -> ChatSummary:
    # A hand-edited row may hold any type: the list shows it as text rather than fail on it.
    title = r["title"] if isinstance(r["title"], str) and r["title"].strip() else DEFAULT_TITLE
    times = [t if isinstance(t, (int, float)) and math.isfinite(t) else 0.0 for t in (r["created_at"], r["updated_at"])]
    model = r["model_id"] if isinstance(r["model_id"], str) else None
    return ChatSummary(str(r["id"]), title, model, *times, r["n"], snippet)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _snippet(text: str, query: str, width: int = 60) -> str:
    """A one-line excerpt of text around the first (case-insensitive) match of query."""
    at = text.lower().find(query.lower())
    at = max(at, 0)
    start = max(at - width // 2, 0)
    piece = " ".join(text[start:start + width].split())
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(text) else "")

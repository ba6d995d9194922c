"""Saved chats in SQLite (stdlib sqlite3): versioned migrations, foreign keys, one transaction per write.

The schema version lives in a `schema_version` table (one row per applied migration). Opening a
database from an older version upgrades it in place after copying the file to a timestamped
backup; a damaged database, or one written by a newer smollchat, raises `StoreError` after the same
copy, and the original file is left untouched. Every write is a single transaction, so a crash or a
kill mid-write leaves the last committed state: nothing already saved is lost.

One connection serves all threads (the TUI reads on its UI thread while the generation worker saves
the streaming reply); a lock serialises access.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..contract import SamplingSettings
from .conversation import Conversation, Message


class StoreError(RuntimeError):
    """The database cannot be used; the message says why and where the backup copy is.

    Attributes:
        backup: the copy made before giving up (None when nothing was copied).
    """

    def __init__(self, message: str, backup: Path | None = None) -> None:
        super().__init__(message)
        self.backup = backup


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


@dataclass(frozen=True)
class Migration:
    """One schema step: `apply(conn)` runs inside the upgrade transaction."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _v1(conn: sqlite3.Connection) -> None:
    conn.execute("""
        CREATE TABLE chats (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            model_id TEXT,
            system_prompt TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            controls TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            current_leaf TEXT
        )""")
    conn.execute("""
        CREATE TABLE messages (
            id TEXT PRIMARY KEY,
            chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            content TEXT NOT NULL,
            created_at REAL NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'stopped', 'error', 'streaming')),
            run TEXT NOT NULL DEFAULT '{}',
            token_ids TEXT
        )""")
    conn.execute("CREATE INDEX messages_by_chat ON messages(chat_id, created_at)")


def _v2(conn: sqlite3.Connection) -> None:
    conn.execute("""
        CREATE TABLE presets (
            name TEXT PRIMARY KEY,
            settings TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""")
    conn.execute("CREATE TABLE app_settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    # Sibling lookups and the chat list's ordering.
    conn.execute("CREATE INDEX messages_by_parent ON messages(parent_id)")
    conn.execute("CREATE INDEX chats_by_update ON chats(updated_at)")


#: SQLite primary result codes: SQLITE_CORRUPT, SQLITE_NOTADB (a damaged file); SQLITE_BUSY, SQLITE_LOCKED.
_CORRUPT = (11, 26)
_BUSY = (5, 6)

#: Every schema step, oldest first. Never edit a released step: add a new one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "chats and message trees", _v1),
    Migration(2, "sampling presets, app settings, indexes", _v2),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class Store:
    """The chat database. `Store()` opens `locations.database_path()`."""

    def __init__(self, path: Path | str | None = None, *, timeout: float = 10.0) -> None:
        if path is None:
            from ..locations import database_path
            path = database_path()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the chat database {self.path}: {e}") from None
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            if existed:
                self._check_integrity()
            self._migrate(existed)
        except StoreError:
            self._conn.close()
            raise
        except sqlite3.Error as e:
            self._conn.close()
            raise self._error(e, "opened") from None

    # Opening.
    def _check_integrity(self) -> None:
        rows = self._conn.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            raise self._damaged("; ".join(str(r[0]) for r in rows[:3]))

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
        """Copy the database (and any journal beside it) to a timestamped name; return the copy's path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.{reason}-{stamp}.bak")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.{reason}-{stamp}-{n}.bak")
        shutil.copy2(self.path, dest)
        for suffix in ("-journal", "-wal"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                shutil.copy2(side, dest.with_name(dest.name + suffix))
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
        """A StoreError for a failed SQLite call: damaged files are copied aside first."""
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT or (not code and ("malformed" in str(e) or "not a database" in str(e))):
            return self._damaged(str(e))
        if code in _BUSY or "locked" in str(e):
            return StoreError(f"The chat database {self.path} could not be {doing}: it is locked by another program "
                              "(is another smollchat running?). Close it and try again.")
        return StoreError(f"The chat database {self.path} could not be {doing}: {e}.")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is saved, or none of it."""
        with self._lock:
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
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._version()

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
        return [_summary(r, _snippet(r["hit"], query.strip()) if r["hit"] else "") for r in rows]

    def recent_prompts(self, limit: int = 200) -> list[str]:
        """The user's last `limit` distinct messages over all chats, oldest first (composer recall)."""
        rows = self._read("SELECT content FROM messages WHERE role = 'user' GROUP BY content "
                          "ORDER BY max(created_at) DESC LIMIT ?", (limit,))
        return [r["content"] for r in reversed(rows)]

    def exists(self, chat_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM chats WHERE id = ?", (chat_id,)))

    def load(self, chat_id: str) -> Conversation:
        """The whole chat; KeyError when it does not exist."""
        rows = self._read("SELECT * FROM chats WHERE id = ?", (chat_id,))
        if not rows:
            raise KeyError(f"no chat {chat_id!r} in {self.path}")
        c = rows[0]
        msgs = self._read("SELECT * FROM messages WHERE chat_id = ? ORDER BY created_at, rowid", (chat_id,))
        return Conversation.from_dict({
            "id": c["id"], "title": c["title"], "model_id": c["model_id"], "system_prompt": c["system_prompt"],
            "settings": json.loads(c["settings"]), "controls": json.loads(c["controls"]),
            "created_at": c["created_at"], "updated_at": c["updated_at"], "current_leaf": c["current_leaf"],
            "messages": [_message_dict(m) for m in msgs]})

    def save(self, conv: Conversation) -> None:
        """Write the whole chat (insert or update; messages no longer in the tree are removed)."""
        ordered = sorted(conv.messages.values(), key=lambda m: (_depth(conv, m), m.created_at))
        with self._tx() as conn:
            self._write_chat(conn, conv)
            keep = set(conv.messages)
            stored = {r[0] for r in conn.execute("SELECT id FROM messages WHERE chat_id = ?", (conv.id,))}
            for mid in stored - keep:
                conn.execute("DELETE FROM messages WHERE id = ?", (mid,))
            for m in ordered:
                self._write_message(conn, conv.id, m)

    def save_message(self, chat_id: str, msg: Message, current_leaf: str | None = None) -> None:
        """Write one message (cheap enough to call while a reply streams); the chat must be saved already."""
        with self._tx() as conn:
            if not conn.execute("SELECT 1 FROM chats WHERE id = ?", (chat_id,)).fetchone():
                raise KeyError(f"no chat {chat_id!r}: save the conversation before its messages")
            self._write_message(conn, chat_id, msg)
            conn.execute("UPDATE chats SET updated_at = max(updated_at, ?) WHERE id = ?", (time.time(), chat_id))
            if current_leaf is not None:
                conn.execute("UPDATE chats SET current_leaf = ? WHERE id = ?", (current_leaf, chat_id))

    def rename(self, chat_id: str, title: str) -> None:
        title = title.strip()
        if not title:
            raise ValueError("a chat title cannot be empty")
        with self._tx() as conn:
            if conn.execute("UPDATE chats SET title = ?, updated_at = ? WHERE id = ?",
                            (title, time.time(), chat_id)).rowcount == 0:
                raise KeyError(f"no chat {chat_id!r}")

    def delete(self, chat_id: str) -> None:
        """Delete a chat and (by cascade) all its messages."""
        with self._tx() as conn:
            conn.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    # Presets: named sampling settings a chat can refer to (`conv.settings["preset"]`).
    def list_presets(self) -> dict[str, dict[str, Any]]:
        """Every preset by name (sorted)."""
        return {r["name"]: json.loads(r["settings"]) for r in self._read("SELECT * FROM presets ORDER BY name")}

    def get_preset(self, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT settings FROM presets WHERE name = ?", (name,))
        return json.loads(rows[0]["settings"]) if rows else None

    def save_preset(self, name: str, settings: dict[str, Any]) -> None:
        """Create or replace a preset; the settings must be valid SamplingSettings overrides."""
        name = name.strip()
        if not name:
            raise ValueError("a preset needs a name")
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

    # App settings (theme, last model, ...): JSON values by key.
    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self._read("SELECT value FROM app_settings WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._tx() as conn:
            conn.execute("INSERT INTO app_settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, json.dumps(value)))

    @staticmethod
    def _write_chat(conn: sqlite3.Connection, conv: Conversation) -> None:
        conn.execute(
            """INSERT INTO chats (id, title, model_id, system_prompt, settings, controls, created_at, updated_at,
                                  current_leaf) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET title = excluded.title, model_id = excluded.model_id,
                 system_prompt = excluded.system_prompt, settings = excluded.settings, controls = excluded.controls,
                 updated_at = excluded.updated_at, current_leaf = excluded.current_leaf""",
            (conv.id, conv.title, conv.model_id, conv.system_prompt, json.dumps(conv.settings),
             json.dumps(conv.controls), conv.created_at, conv.updated_at, conv.current_leaf))

    @staticmethod
    def _write_message(conn: sqlite3.Connection, chat_id: str, m: Message) -> None:
        owner = conn.execute("SELECT chat_id FROM messages WHERE id = ?", (m.id,)).fetchone()
        if owner is not None and owner[0] != chat_id:
            raise StoreError(f"message {m.id} already belongs to chat {owner[0]}; save a copy with fresh ids "
                             "(Conversation.clone()) instead")
        conn.execute(
            """INSERT INTO messages (id, chat_id, parent_id, role, content, created_at, status, run, token_ids)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET content = excluded.content, status = excluded.status,
                 run = excluded.run, token_ids = excluded.token_ids""",
            (m.id, chat_id, m.parent_id, m.role, m.content, m.created_at, m.status, json.dumps(m.run),
             None if m.token_ids is None else json.dumps(m.token_ids)))


def _depth(conv: Conversation, m: Message) -> int:
    return len(conv.path(m.id))


def _message_dict(r: sqlite3.Row) -> dict[str, Any]:
    return {"id": r["id"], "parent_id": r["parent_id"], "role": r["role"], "content": r["content"],
            "created_at": r["created_at"], "status": r["status"], "run": json.loads(r["run"]),
            "token_ids": None if r["token_ids"] is None else json.loads(r["token_ids"])}


def _summary(r: sqlite3.Row, snippet: str = "") -> ChatSummary:
    return ChatSummary(r["id"], r["title"], r["model_id"], r["created_at"], r["updated_at"], r["n"], snippet)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _snippet(text: str, query: str, width: int = 60) -> str:
    """A one-line excerpt of text around the first (case-insensitive) match of query."""
    at = text.lower().find(query.lower())
    at = max(at, 0)
    start = max(at - width // 2, 0)
    piece = " ".join(text[start:start + width].split())
    return ("…" if start > 0 else "") + piece + ("…" if start + width < len(text) else "")

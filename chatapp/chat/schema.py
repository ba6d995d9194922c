"""The chat database's schema, as the migrations that build it (applied in order by `store.Store`).

Each step runs inside the upgrade transaction; the version reached is recorded in `schema_version`.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable


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


def _v3(conn: sqlite3.Connection) -> None:
    # Apart from the run card, which is rewritten while a reply streams: a record is written once, at the end.
    conn.execute("CREATE TABLE token_details (message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE, "
                 "record TEXT NOT NULL)")


#: Every schema step, oldest first. Never edit a released step: add a new one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "chats and message trees", _v1),
    Migration(2, "sampling presets, app settings, indexes", _v2),
    Migration(3, "per-token records of replies (the token inspector)", _v3),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

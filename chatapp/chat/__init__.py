"""The chat layer: conversations, sessions, storage, export. Plain Python (no torch, no Textual)."""

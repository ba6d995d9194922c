"""Export a chat to Markdown (one branch, with a settings front-matter) or JSON (the whole tree), and
import that JSON back.

The JSON format is versioned: {"format": "smollchat.chat", "version": 1, "exported_at": ...,
"conversation": Conversation.to_dict(), "token_details": {message id: per-token record}} (the last one
optional: chat/token_record.py). Importing validates everything (Conversation.from_dict, the validator the
store uses too) and says what is wrong; ids that collide with saved chats are replaced when the chat is
stored (`Store.import_chat`; `import_json` carries the per-token records over to the new ids).
"""
from __future__ import annotations

import json
import time
from typing import Any

from . import token_record
from .conversation import Conversation, Message, new_id, parse_json

FORMAT = "smollchat.chat"
VERSION = 1
_ROLE_TITLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def to_markdown(conv: Conversation, leaf: str | None = None, default_system: str | None = None) -> str:
    """The branch root..leaf (default: the one on screen) as Markdown with a YAML front-matter.

    The front-matter holds the model, system prompt, sampling settings and controls; each reply is
    followed by a one-line summary of its run card. A chat on its model's default system prompt
    exports the text the model received (the last reply's run card, else `default_system`).
    """
    path = conv.path(leaf)
    system = conv.system_prompt
    if system is None:
        system = next((m.run["system_prompt"] for m in reversed(path)
                       if m.role == "assistant" and isinstance(m.run.get("system_prompt"), str)), default_system)
    meta: list[tuple[str, Any]] = [
        ("title", conv.title), ("chat_id", conv.id), ("model", conv.model_id),
        ("system_prompt", system), ("settings", conv.settings), ("controls", conv.controls),
        ("created", _iso(conv.created_at)), ("exported", _iso(time.time())),
        ("messages", len(path)),
    ]
    if conv.system_prompt is None and system is not None:
        meta.insert(4, ("system_prompt_source", "the model's default"))
    if any(len(conv.siblings(m.id)) > 1 for m in path):
        meta.append(("branch", "one branch of a chat with alternatives; the JSON export holds them all"))
    # JSON scalars and flow mappings are valid YAML, and keep every string exactly (quotes, newlines).
    lines = ["---", *(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta), "---", "", f"# {conv.title}", ""]
    for m in path:
        i, n = conv.sibling_index(m.id)
        variant = f" ({i + 1}/{n})" if n > 1 else ""
        lines += [f"## {_ROLE_TITLES[m.role]}{variant}", "", m.content.rstrip("\n") or "*(empty)*", ""]
        if m.role == "assistant":
            card = run_summary(m)
            if card:
                lines += [f"> {card}", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def run_summary(m: Message) -> str:
    """One line from a reply's run card: model, tokens, speed, stop reason, seed, controls."""
    run = m.run
    bits = []
    if run.get("model_id"):
        rev = run.get("revision")
        bits.append(f"{run['model_id']}" + (f"@{rev}" if rev and rev != "main" else ""))
    if run.get("edited_from"):
        bits.append("edited by hand")
    if "new_tokens" in run:
        bits.append(f"{run['new_tokens']} tokens")
    timings = run.get("timings") or {}
    if timings.get("decode_tok_s"):
        bits.append(f"{timings['decode_tok_s']:.1f} tok/s")
    if timings.get("ttft_s"):
        bits.append(f"TTFT {timings['ttft_s'] * 1000:.0f} ms")
    if run.get("stop_reason"):
        bits.append(f"stop: {run['stop_reason']}")
    if run.get("seed") is not None:
        bits.append(f"seed {run['seed']}")
    if run.get("controls"):
        bits.append(", ".join(f"{k}={v}" for k, v in run["controls"].items()))
    steps = [s for s in run.get("steps") or () if s is not None]
    if steps:
        bits.append(f"steps/token mean {sum(steps) / len(steps):.1f} max {max(steps)}")
    if m.status in ("stopped", "error"):
        bits.append(m.status + (f": {run['error']}" if run.get("error") else ""))
    return " · ".join(bits)


def to_json(conv: Conversation, token_records: dict[str, dict[str, Any]] | None = None) -> str:
    """The whole tree (every branch, run cards and token ids) in the versioned import format, with the
    per-token records given (by message id: `Store.token_records(list(conv.messages))`)."""
    data = {"format": FORMAT, "version": VERSION, "exported_at": time.time(), "conversation": conv.to_dict()}
    records = {k: v for k, v in (token_records or {}).items() if k in conv.messages}
    if records:
        data["token_details"] = records
    return json.dumps(data, ensure_ascii=False, indent=1)


def from_json(text: str) -> Conversation:
    """Read `to_json` output back; ValueError with a clear message for a broken or foreign file.

    A message id that appears twice in the file keeps its first message; the others get fresh ids
    (replies naming that id stay under the first), noted in the result's `repairs`.
    """
    return _read(text)[0]


def import_json(text: str, store: Any) -> Conversation:
    """`from_json`, stored as a new chat (`Store.import_chat`), with its per-token records under the ids
    the stored chat got."""
    conv, records = _read(text)
    remap: dict[str, str] = {}  # stays empty when the chat keeps its own ids
    stored = store.import_chat(conv, remap)
    for old, record in records.items():
        if old in conv.messages:
            store.save_token_record(remap.get(old, old), record)
    return stored


def _read(text: str) -> tuple[Conversation, dict[str, dict[str, Any]]]:
    if not isinstance(text, str):
        raise ValueError(f"not a smollchat chat export: expected text, got {type(text).__name__}")
    try:
        data = parse_json(text, "the file")
    except ValueError as e:
        raise ValueError(f"not a smollchat chat export: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a smollchat chat export: expected \"format\": \"{FORMAT}\"")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"chat export has no valid version (got {version!r})")
    if version > VERSION:
        raise ValueError(f"this chat was exported by a newer smollchat (format version {version}; "
                         f"this version reads up to {VERSION}); upgrade smollchat to import it")
    raw = data.get("conversation")
    notes = _fresh_duplicate_ids(raw)
    try:
        conv = Conversation.from_dict(raw)
    except ValueError as e:
        raise ValueError(f"broken chat export: {e}") from None
    conv.repairs = notes
    raw_records = data.get("token_details", {})
    if not isinstance(raw_records, dict):
        raise ValueError("broken chat export: \"token_details\" must map message ids to per-token records")
    records = {}
    for mid, record in raw_records.items():
        msg = conv.messages.get(mid)
        if msg is None or msg.role != "assistant":
            raise ValueError(f"broken chat export: token_details names {mid!r}, which is not a reply in this chat")
        records[mid] = token_record.check(record, f"broken chat export: reply {mid}")
    return conv, records


def _fresh_duplicate_ids(raw: Any) -> list[str]:
    """Give every repeated message id after the first a fresh one, in place; return what was changed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("messages"), list):
        return []
    seen: set[str] = set()
    notes = []
    for i, m in enumerate(raw["messages"]):
        if not isinstance(m, dict) or not isinstance(m.get("id"), str):
            continue
        if m["id"] in seen:
            fresh = new_id()
            notes.append(f"message #{i + 1} repeated the id {m['id']}; it was given the id {fresh}")
            raw["messages"][i] = {**m, "id": fresh}
        else:
            seen.add(m["id"])
    return notes


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

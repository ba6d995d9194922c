"""Export to Markdown (one branch + front-matter) and JSON (the whole tree), and import back."""
from __future__ import annotations

import json

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.export import FORMAT, VERSION, from_json, run_summary, to_json, to_markdown
from chatapp.chat.store import Store


def tree() -> Conversation:
    c = Conversation(model_id="huginn", system_prompt='Say "hi"\nthen stop.', settings={"temperature": 0.4},
                     controls={"num_steps": 16})
    u = c.add(None, "user", "Write *code*:\n```py\nx = 1\n```")
    c.add(u.id, "assistant", "Draft one", run={"model_id": "huginn", "revision": "abc123", "new_tokens": 3,
                                                "stop_reason": "eos", "seed": 9, "steps": [4, 8, 12],
                                                "timings": {"ttft_s": 0.2, "decode_tok_s": 31.4}},
          token_ids=[1, 2, 3])
    c.add(u.id, "assistant", "Draft two", status="stopped",
          run={"model_id": "huginn", "stop_reason": "cancelled", "new_tokens": 2})
    return c


def front_matter(md: str) -> dict:
    lines = md.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    # Every value is written as JSON, which YAML reads the same way.
    return {k: json.loads(v) for k, v in (ln.split(": ", 1) for ln in lines[1:end])}


def test_markdown_has_settings_front_matter_and_the_branch():
    c = tree()
    md = to_markdown(c)
    meta = front_matter(md)
    assert meta["model"] == "huginn" and meta["system_prompt"] == 'Say "hi"\nthen stop.'
    assert meta["settings"] == {"temperature": 0.4} and meta["controls"] == {"num_steps": 16}
    assert meta["messages"] == 2 and "alternatives" in meta["branch"]
    assert "## User\n\nWrite *code*:\n```py\nx = 1\n```" in md
    assert "## Assistant (2/2)\n\nDraft two" in md and "Draft one" not in md
    assert "stop: cancelled" in md and "stopped" in md


def test_markdown_of_another_branch_and_its_run_card_line():
    c = tree()
    first = c.children(c.roots()[0].id)[0]
    md = to_markdown(c, first.id)
    assert "## Assistant (1/2)\n\nDraft one" in md and "Draft two" not in md
    line = run_summary(first)
    for part in ("huginn@abc123", "3 tokens", "31.4 tok/s", "TTFT 200 ms", "stop: eos", "seed 9",
                 "steps/token mean 8.0 max 12"):
        assert part in line


def test_json_round_trip_keeps_every_branch_and_run_card():
    c = tree()
    text = to_json(c)
    data = json.loads(text)
    assert data["format"] == FORMAT and data["version"] == VERSION
    back = from_json(text)
    assert back.to_dict() == c.to_dict()
    assert len(back.children(back.roots()[0].id)) == 2


def test_imported_chat_saves_as_a_copy_next_to_the_original(tmp_path):
    c = tree()
    with Store(tmp_path / "db.sqlite3") as store:
        store.save(c)
        imported = from_json(to_json(c)).clone()
        store.save(imported)
        assert len(store.list_chats()) == 2
        assert store.load(imported.id).path()[-1].content == "Draft two"


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"format": "something-else", "version": 1}', "expected"),
    ('{"format": "smollchat.chat", "version": "one"}', "no valid version"),
    ('{"format": "smollchat.chat", "version": 99, "conversation": {}}', "newer smollchat"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": []}', "broken chat export"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "messages": '
     '[{"id": "m", "parent_id": "ghost", "role": "user", "content": "", "created_at": 1}]}}', "ghost"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "created_at": [1]}}', "created_at must be a time"),
])
def test_broken_imports_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        from_json(text)

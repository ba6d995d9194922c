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
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "created_at": [1]}}',
     "created_at must be a time"),
])
def test_broken_imports_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        from_json(text)


def _export(**message) -> str:
    m = {"id": "m", "parent_id": None, "role": "assistant", "content": "hi", "created_at": 1.0, **message}
    return json.dumps({"format": FORMAT, "version": 1, "conversation": {"id": "x", "messages": [m]}})


@pytest.mark.parametrize("text, message", [
    (_export(run={"timings": {"decode_tok_s": "fast"}}), "run.timings.decode_tok_s must be a finite number"),
    (_export(run={"new_tokens": -3}), "run.new_tokens must be an integer >= 0"),
    (_export(run={"steps": [1, "two"]}), r"run.steps\[1\] must be"),
    (_export(run={"continued": [{"seed": 1.5}]}), r"run.continued\[0\].seed must be an integer"),
    (_export(created_at=float("nan")), "created_at must be a time"),
    (_export(created_at=float("inf")), "created_at must be a time"),
    (_export(created_at=1e300), "created_at must be a time"),
    (_export(created_at=True), "created_at must be a time"),
    (_export(content="\ud800 lone"), "content is not valid Unicode"),
    (_export(content=["a"]), "content must be a string"),
    (_export(token_ids=[1, 2**40]), "token_ids"),
    (_export(token_ids=[True]), "token_ids"),
    (_export(id=""), "message id must be a non-empty string"),
    (_export(id="x" * 500), "at most 128 characters"),
    (_export(run={"custom": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}),
     "nested more than 32 levels"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "title": {"a": 1}}}',
     "title must be a string"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "settings": {"temperature": "hot"}}}',
     "settings.temperature"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "settings": {"top_p": NaN}}}',
     "settings.top_p"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "settings": {"warp": 9}}}',
     "settings.warp"),
    ('{"format": "smollchat.chat", "version": 1, "conversation": {"id": "x", "controls": {"num_steps": [4]}}}',
     "controls.num_steps"),
])
def test_imports_with_wrong_types_or_ranges_are_refused_before_anything_is_stored(text, message):
    with pytest.raises(ValueError, match=message):
        from_json(text)


def test_json_nested_100000_deep_gives_a_clear_error_not_a_recursion_error():
    deep = "[" * 100_000 + "]" * 100_000
    for text in (deep, _export()[:-2] + ', "settings": {"x": ' + deep + "}}}"):
        with pytest.raises(ValueError, match="nested more than 32 levels deep"):
            from_json(text)
    # Brackets inside strings are text, not nesting.
    assert from_json(_export(content="[" * 1000)).get("m").content == "[" * 1000


def test_message_ids_repeated_inside_the_file_get_fresh_ones():
    c = tree()
    d = json.loads(to_json(c))
    msgs = d["conversation"]["messages"]
    twin = {**msgs[1], "content": "a twin", "created_at": msgs[-1]["created_at"] + 1}
    msgs.append(twin)
    back = from_json(json.dumps(d))
    assert len(back.messages) == 4 and msgs[1]["id"] in back.messages
    fresh = next(m for m in back.messages.values() if m.content == "a twin")
    assert fresh.id != msgs[1]["id"] and fresh.parent_id == msgs[1]["parent_id"]
    assert back.repairs and "repeated the id" in back.repairs[0]


def test_run_summary_of_an_imported_card_never_fails():
    c = from_json(_export(run={"timings": {"decode_tok_s": 12.5, "ttft_s": None}, "steps": [None, 3], "seed": 2**63}))
    assert "12.5 tok/s" in run_summary(c.get("m"))

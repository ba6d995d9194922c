"""Property test: any valid chat (any tree shape, any text, any run card) survives export -> import
unchanged, and its Markdown export never fails."""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from chatapp.chat.conversation import MAX_TIME, STATUSES, Conversation
from chatapp.chat.export import from_json, to_json, to_markdown
from props import PROPS

# Any text but lone surrogates (which no UTF-8 file can hold): controls, quotes, brackets, NUL, RTL...
TEXT = st.text(max_size=40)
TIME = st.floats(0, MAX_TIME, allow_nan=False)
RATE = st.none() | st.floats(0, 1e6, allow_nan=False)
SCALAR = (st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
          | TEXT)
RUN = st.fixed_dictionaries({}, optional={
    "model_id": TEXT, "revision": st.none() | TEXT, "seed": st.none() | st.integers(0, 2**64 - 1),
    "stop_reason": st.sampled_from(["eos", "max_tokens", "cancelled", "context_full", "interrupted", "error"]),
    "new_tokens": st.integers(0, 10**6), "prompt_tokens": st.integers(0, 10**6),
    "timings": st.fixed_dictionaries({"ttft_s": RATE, "prefill_tok_s": RATE, "decode_tok_s": RATE}),
    "steps": st.lists(st.integers(0, 64), max_size=8),
    "tokens": st.fixed_dictionaries({"logprob": st.lists(st.floats(-50, 0), max_size=8),
                                     "entropy": st.lists(st.floats(0, 12), max_size=8)}),
    "controls": st.dictionaries(TEXT, SCALAR, max_size=3), "error": TEXT, "edited_from": TEXT,
    "settings": st.dictionaries(TEXT, SCALAR, max_size=3),
    "future_field": st.recursive(SCALAR, lambda x: st.lists(x, max_size=3) | st.dictionaries(TEXT, x, max_size=3),
                                 max_leaves=10),
})
SETTINGS = st.fixed_dictionaries({}, optional={
    "temperature": st.floats(0, 2), "top_k": st.integers(0, 100), "top_p": st.floats(0.01, 1),
    "max_new_tokens": st.integers(1, 4096), "seed": st.integers(0, 2**64 - 1),
    "stop_strings": st.lists(TEXT, max_size=3),
    "stop_ids": st.lists(st.integers(0, 2**31 - 1), max_size=3), "preset": TEXT,
})


@st.composite
def chats(draw) -> Conversation:
    c = Conversation(title=draw(TEXT.filter(str.strip)), model_id=draw(st.none() | TEXT.filter(bool)),
                     system_prompt=draw(st.none() | TEXT), settings=draw(SETTINGS),
                     controls=draw(st.dictionaries(TEXT.filter(bool), SCALAR, max_size=3)), created_at=draw(TIME))
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.none() | st.sampled_from(list(c.messages))) if c.messages else None
        role = draw(st.sampled_from(["system", "user", "assistant"]))
        c.add(parent, role, draw(TEXT), status=draw(st.sampled_from(STATUSES)),
              run=draw(RUN) if role == "assistant" else {},
              token_ids=draw(st.none() | st.lists(st.integers(0, 2**31 - 1), max_size=6)),
              created_at=draw(st.none() | TIME))
    if c.messages:
        c.current_leaf = draw(st.sampled_from(list(c.messages)))
    return c


@PROPS
@given(chats())
def test_export_then_import_gives_the_same_chat(c):
    back = from_json(to_json(c))
    assert back.to_dict() == c.to_dict() and back.repairs == []
    # The stored form reads back the same way (the store keeps the same JSON per field).
    assert Conversation.from_dict(json.loads(json.dumps(c.to_dict()))).to_dict() == c.to_dict()


@PROPS
@given(chats())
def test_markdown_export_of_any_chat_and_branch(c):
    for leaf in [None, *list(c.messages)[:3]]:
        md = to_markdown(c, leaf)
        assert md.startswith("---\n") and md.endswith("\n")

"""Branch at a token (issue 15): a new sibling reply keeps the tokens before k, puts the chosen alternative
at k and continues from it; the prompt cache skips the prefix the state allows (a KV cache: everything
before k; a recurrent state: the prompt, from its snapshot), and the continuation is what a fresh engine
answers to the same ids. The branch replays identical."""
from __future__ import annotations

import pytest

from chatapp.catalog import get_entry
from chatapp.chat.conversation import Conversation
from chatapp.chat.replay import replay
from chatapp.chat.session import Session
from chatapp.contract import Done, SamplingSettings
from chatapp.engine.runtime import load_engine

GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram": 0, "max_new_tokens": 8}


def _engine(entry_id):
    return load_engine(get_entry(entry_id), device="cpu", dtype="float32", compile="off")


def _run(events):
    events = list(events)
    assert isinstance(events[-1], Done)
    return events[:-1], events[-1]


@pytest.mark.parametrize("entry_id, kv", [("axiom-tiny", True), ("odinnext-tiny", False)])
def test_branch_at_a_token_keeps_the_prefix_puts_the_choice_and_continues(entry_id, kv):
    engine = _engine(entry_id)
    session = Session(engine)
    conv = Conversation(settings=GREEDY)
    user = conv.add(None, "user", "Tell me a story")
    _, done = _run(session.stream(conv, user.id))
    src = conv.get(conv.current_leaf)
    prompt_len = done.prompt_tokens
    k = 3
    record = session.token_record(conv, src.id)
    alt, alt_lp = record["alternatives"][k][1]  # the runner-up at token k
    assert record["ids"][k] == record["alternatives"][k][0][0] != alt  # greedy took the top one

    events, done = _run(session.branch_at(conv, src.id, k, alt))
    new = conv.get(conv.current_leaf)
    assert new.id != src.id and new.parent_id == src.parent_id and conv.children(user.id) == [src, new]
    assert new.token_ids[:k + 1] == [*src.token_ids[:k], alt]
    assert new.token_ids[k + 1:] == [e.token_id for e in events]
    tok = engine.tokenizer
    assert new.content.startswith(tok.decode([i for i in new.token_ids[:k + 1] if i not in tok.special_ids]))
    # The figures: a KV cache is trimmed to everything before k; a recurrent state resumes from the prompt's end.
    assert done.reused_tokens == (prompt_len + k if kv else prompt_len) == new.run["reused_tokens"]
    assert done.prompt_tokens == prompt_len + k + 1
    assert new.run["branched_from"] == {"message": src.id, "token": k, "chosen": alt,
                                        "replaced": src.token_ids[k], "prefix_tokens": k + 1}
    branched = session.token_record(conv, new.id)
    assert branched["ids"] == new.token_ids and branched["logprob"][k] == alt_lp
    assert len(new.run["tokens"]["logprob"]) == len(new.token_ids)

    fresh = _engine(entry_id)  # nothing cached: the reference continuation of the same ids
    settings = SamplingSettings(**{**GREEDY, "seed": new.run["seed"]})
    want = [e.token_id for e in list(fresh.generate(session.last_prompt.ids, settings))[:-1]]
    assert want == [e.token_id for e in events]
    assert replay(session, conv, new).identical


def test_branch_at_refuses_what_makes_no_sense():
    engine = _engine("axiom-tiny")
    session = Session(engine)
    conv = Conversation(settings=GREEDY)
    user = conv.add(None, "user", "hi")
    _run(session.stream(conv, user.id))
    reply = conv.get(conv.current_leaf)
    n = len(reply.token_ids)
    for args, says in [((user.id, 0, 5), "generated reply"), ((reply.id, n, 5), "outside this reply"),
                       ((reply.id, 0, -1), "vocabulary"), ((reply.id, 0, engine.tokenizer.stop_ids[0]), "ends the reply")]:
        with pytest.raises(ValueError, match=says):
            session.branch_at(conv, *args)
    assert len(conv.children(user.id)) == 1  # nothing was added by a refused branch

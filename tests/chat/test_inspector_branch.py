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


@pytest.mark.parametrize("entry_id", ["odinnext-tiny", "genesis-tiny"])
def test_branch_inside_a_long_reply_resumes_from_a_snapshot_taken_inside_it(entry_id):
    """A state that cannot drop tokens (OdinNext's recurrence; Genesis's recurrence beside its KV) is
    snapshotted every `every` tokens of a reply: a branch at token k runs only the tokens after the last
    snapshot at or before k, and continues exactly as a fresh engine that pre-fills the whole prefix."""
    engine = _engine(entry_id)
    assert not engine.state.can_trim
    engine.cache.every = 4
    session = Session(engine)
    conv = Conversation(settings={**GREEDY, "max_new_tokens": 16})
    user = conv.add(None, "user", "Tell me a story")
    _, done = _run(session.stream(conv, user.id))
    src = conv.get(conv.current_leaf)
    assert done.stop_reason == "max_tokens"  # random weights: no end of turn in 16 tokens at this seed
    k = 9
    alt = session.token_record(conv, src.id)["alternatives"][k][1][0]

    events, branched = _run(session.branch_at(conv, src.id, k, alt))
    # Snapshots after 4 and 8 reply tokens: the one at 8 serves, 8 + 2 prompt tokens are left to run.
    assert branched.reused_tokens == done.prompt_tokens + 8 == conv.get(conv.current_leaf).run["reused_tokens"]
    assert branched.prompt_tokens == done.prompt_tokens + k + 1

    fresh = _engine(entry_id)
    settings = SamplingSettings(**{**GREEDY, "max_new_tokens": 16, "seed": conv.get(conv.current_leaf).run["seed"]})
    fresh_events, fresh_done = _run(fresh.generate(session.last_prompt.ids, settings))
    assert fresh_done.reused_tokens == 0
    assert [e.token_id for e in fresh_events] == [e.token_id for e in events]


def test_snapshots_inside_replies_keep_to_their_share_of_the_budget():
    """Snapshots taken inside replies hold at most MID_SHARE of the budget, oldest out first; prompt-end
    snapshots are not pushed out by them."""
    import torch

    from chatapp.engine.arch.base import Forward
    from chatapp.engine.prompt_cache import MID_SHARE, PromptCache
    from chatapp.engine.state import RecurrentState, StateList

    state = StateList([RecurrentState((1, 4), "cpu")], max_len=64)  # 16 bytes per snapshot
    cache = PromptCache(state, budget=80, every=2)
    cache.begin("k", [1, 2])
    state.advance(2)
    cache.prompt_done([1, 2], Forward(torch.zeros(2)))
    for n in range(1, 6):
        state.advance(1)
        cache.inside_reply([1, 2, *range(10, 10 + n)])
    assert cache.nbytes <= cache.budget and sum(16 for s in cache._snaps.values() if s.mid) <= 80 * MID_SHARE
    assert cache.begin("k", [1, 2])[0] == 2  # the prompt end is still there
    # The newest ones stayed: a prompt extending the 5th reply token resumes there; the 1st is gone.
    assert cache.begin("k", [1, 2, 10, 11, 12, 13, 14, 99])[0] == 7
    assert cache.begin("k", [1, 2, 10, 99])[0] == 2


def test_branch_with_a_typed_replacement_or_with_other_compute():
    """A typed replacement (several ids) goes in at token k; with no token the model draws token k anew
    under the chat's controls now (Huginn's depth here); both keep the tokens before k and continue as a
    fresh engine does on the same ids."""
    engine = load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", compile="off")
    session = Session(engine)
    conv = Conversation(settings=GREEDY, controls={"num_steps": 4})
    user = conv.add(None, "user", "Tell me a story")
    _run(session.stream(conv, user.id))
    src = conv.get(conv.current_leaf)
    k = 2
    typed = engine.tokenizer.encode(" yes", allow_special=False)
    assert len(typed) > 1  # a byte-level demo tokenizer: one id per byte
    events, _ = _run(session.branch_at(conv, src.id, k, typed))
    new = conv.get(conv.current_leaf)
    assert new.token_ids[:k + len(typed)] == [*src.token_ids[:k], *typed]
    assert new.run["branched_from"]["chosen"] == typed and new.run["branched_from"]["prefix_tokens"] == k + len(typed)
    record = session.token_record(conv, new.id)
    # The typed ids carry their text on the last of them (as a stream shows a character split over bytes).
    assert record["ids"] == new.token_ids and record["text"][k:k + len(typed)] == [""] * (len(typed) - 1) + [" yes"]
    assert record["logprob"][k + 1:k + len(typed)] == [None] * (len(typed) - 1)
    assert replay(session, conv, new).identical

    conv.controls["num_steps"] = 2  # other compute from token k on
    events, done = _run(session.branch_at(conv, src.id, k, None))
    rerun = conv.get(conv.current_leaf)
    assert rerun.token_ids[:k] == src.token_ids[:k] and rerun.run["controls"]["num_steps"] == 2
    assert rerun.run["branched_from"]["chosen"] is None and rerun.run["branched_from"]["prefix_tokens"] == k
    assert done.reused_tokens == 0  # the depth is part of what the state holds: nothing cached under 2 steps
    fresh = load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", compile="off")
    settings = SamplingSettings(**{**GREEDY, "seed": rerun.run["seed"]})
    want = [e.token_id for e in list(fresh.generate(session.last_prompt.ids, settings, {"num_steps": 2}))[:-1]]
    assert want == [e.token_id for e in events]
    with pytest.raises(ValueError, match="replacement is empty"):
        session.branch_at(conv, src.id, k, [])

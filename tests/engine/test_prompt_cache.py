"""The engine's prompt cache: prefix reuse per state kind through the chat session (regenerate, edit,
continue, branch and chat switches), and the cache's own rules (keys, LRU within a byte budget)."""
from __future__ import annotations

import pytest
import torch

from chatapp.chat.conversation import Conversation
from chatapp.chat.session import Session
from chatapp.contract import Done
from chatapp.engine.arch.base import Forward
from chatapp.engine.prompt_cache import PromptCache
from chatapp.engine.state import KVState, RecurrentState, StateList

from .conftest import demo_engine

GREEDY = {"temperature": 0.0, "max_new_tokens": 6, "seed": 1}
# Huginn's per-step slots at a depth that keeps the tiny demo quick (a state-changing control: fixed here).
CONTROLS = {"huginn-tiny": {"num_steps": 4}}


def _reply(session, conv, parent, **kw):
    done = list(session.stream(conv, parent, **kw))[-1]
    assert isinstance(done, Done) and done.stop_reason in ("eos", "max_tokens"), done
    return done, conv.get(conv.current_leaf)


def _fresh_tokens(entry_id, ids, controls):
    """What a new engine (empty cache) answers to the same ids: the reference for every reuse."""
    engine = demo_engine(entry_id, dtype="float32")
    settings = engine.default_settings().with_overrides(**GREEDY)
    return [e.token_id for e in list(engine.generate(ids, settings, controls))[:-1]]


@pytest.mark.parametrize("entry_id, kind", [("axiom-tiny", "kv"), ("odinnext-tiny", "recurrent"),
                                            ("genesis-tiny", "hybrid"), ("huginn-tiny", "huginn slots")])
def test_regenerate_edit_continue_and_switches_skip_the_held_prefix(entry_id, kind):
    engine = demo_engine(entry_id, dtype="float32")
    trims = engine.state.can_trim
    assert trims == (kind in ("kv", "huginn slots"))
    s = Session(engine)
    c = Conversation(settings=dict(GREEDY), controls=dict(CONTROLS.get(entry_id, {})))
    first, reply1 = _reply(s, c, c.add(None, "user", "Hello there").id)
    held = first.prompt_tokens + first.new_tokens - 1  # the last sampled token is never fed

    u2 = c.add(reply1.id, "user", "Tell me more")
    second, reply2 = _reply(s, c, u2.id)
    assert second.reused_tokens == held  # the next turn extends what the state absorbed

    # Regenerate: the whole prompt was cached (a state that cannot trim restores the prompt-end snapshot).
    regen, again = _reply(s, c, u2.id)
    assert regen.reused_tokens == second.prompt_tokens - (1 if trims else 0)
    assert again.token_ids == reply2.token_ids  # the restored state answers exactly as before

    # Edit the second question: resume after the first reply, and answer as a fresh engine does.
    edited = c.edit(u2.id, "Tell me less")
    third, reply3 = _reply(s, c, edited.id)
    assert third.reused_tokens >= held
    assert reply3.token_ids == _fresh_tokens(entry_id, s.last_prompt.ids, s.controls_for(c))

    # Continue the edited reply: its prompt is that reply left open.
    cont = list(s.stream(c, None, continue_from=reply3.id))[-1]
    assert cont.reused_tokens >= third.prompt_tokens - 1

    # Another chat, then back to the first branch: its snapshot is still in the cache.
    other = Conversation(settings=dict(GREEDY), controls=dict(CONTROLS.get(entry_id, {})))
    _reply(s, other, other.add(None, "user", "Something else entirely").id)
    c.switch_sibling(u2.id, 0)
    back, reply4 = _reply(s, c, u2.id)
    assert back.reused_tokens >= second.prompt_tokens - 1
    assert reply4.token_ids == reply2.token_ids
    assert engine.memory().prompt_cache == engine.cache.nbytes > 0


def _kv_state():
    return StateList([KVState(32, 1, 2, "cpu", torch.float32)], max_len=32)


def _absorb(cache, ids):
    """What a forward does to the state: append len(ids) positions."""
    for layer in cache.state:
        layer.update(torch.ones(1, len(ids), 1, 2), torch.ones(1, len(ids), 1, 2))
    cache.state.advance(len(ids))


def test_snapshots_are_kept_per_key_and_not_shared_across_keys():
    cache = PromptCache(_kv_state())
    reused, _ = cache.begin("a", [1, 2, 3, 4])
    _absorb(cache, [1, 2, 3, 4])
    cache.prompt_done([1, 2, 3, 4], None)
    assert reused == 0
    # Other state-changing controls: nothing is reused, but what the state held is kept for later.
    assert cache.begin("b", [1, 2, 3, 4, 5]) == (0, None) and cache.state.length == 0 and len(cache) == 1
    _absorb(cache, [1, 2, 3, 4, 5])
    cache.prompt_done([1, 2, 3, 4, 5], None)
    reused, _ = cache.begin("a", [1, 2, 3, 4, 9])
    assert reused == 4 and cache.state.length == 4 and cache.held == [1, 2, 3, 4]


def test_a_recurrent_state_continues_or_restores_but_never_trims():
    state = StateList([RecurrentState((1, 4), "cpu")], max_len=32)
    cache = PromptCache(state)
    cache.begin("k", [1, 2, 3])
    state[0].state += 1
    state.advance(3)
    first = torch.tensor([0.5, 2.0])
    cache.prompt_done([1, 2, 3], Forward(first))
    state[0].state += 10  # the reply
    state.advance(2)
    cache.absorbed([7, 8])
    # A prompt that extends the live state continues it.
    assert cache.begin("k", [1, 2, 3, 7, 8, 9]) == (5, None) and state.length == 5
    reused, got = cache.begin("k", [1, 2, 3])  # regenerate: the prompt-end snapshot, with its logits
    assert reused == 3 and torch.equal(got.logits, first) and float(state[0].state[0, 0]) == 1.0
    # A prompt that shares only part of a snapshot cannot use it: that state cannot drop tokens.
    assert cache.begin("k", [1, 2, 5])[0] == 0 and state.length == 0


def test_the_budget_evicts_the_least_recently_used_snapshot():
    state = StateList([RecurrentState((1, 4), "cpu")], max_len=32)  # 16 bytes per snapshot
    cache = PromptCache(state, budget=40)
    for prompt in ([1], [2], [3]):
        cache.begin("k", prompt)
        state.advance(1)
        cache.prompt_done(prompt, Forward(torch.zeros(2)))
        if prompt == [2]:
            cache.begin("k", [1])  # touch [1]: [2] is now the oldest
    assert len(cache) == 2 and cache.nbytes == 32
    assert cache.begin("k", [2])[0] == 0 and cache.begin("k", [1])[0] == 1

"""Exact replay from a run card (issue 15) and Huginn's depth changed while a reply streams: the run card
names everything that decides the tokens, `smollchat replay` regenerates the reply from a JSON export and
reports identical or the first differing token with the likely reason."""
from __future__ import annotations

import json

import pytest

from chatapp.catalog import get_entry
from chatapp.chat.conversation import Conversation
from chatapp.chat.export import to_json
from chatapp.chat.replay import replay
from chatapp.chat.session import Session, prompt_hash
from chatapp.cli import main
from chatapp.contract import ControlChannel, Done
from chatapp.engine.runtime import load_engine


def _chat(entry_id, settings, controls=None, channel_at=None, change=None):
    """A one-turn chat answered by a fresh engine; with `change`, sent through a channel once the reply's
    token `channel_at` has arrived."""
    engine = load_engine(get_entry(entry_id), device="cpu", compile="off")
    session = Session(engine)
    conv = Conversation(settings=settings, controls=controls or {})
    user = conv.add(None, "user", "Tell me a story")
    channel = ControlChannel() if change else None
    events = []
    for ev in session.stream(conv, user.id, channel=channel):
        events.append(ev)
        if change and len(events) == channel_at + 1:
            session.change_controls(change)
    assert isinstance(events[-1], Done) and events[-1].new_tokens >= 4
    return engine, session, conv, conv.get(conv.current_leaf), events[:-1]


def _replay(tmp_path, conv, *extra):
    path = tmp_path / "chat.json"
    path.write_text(to_json(conv), encoding="utf-8")
    return main(["replay", str(path), *extra])


@pytest.mark.parametrize("settings", [{"temperature": 0.0, "max_new_tokens": 8},
                                      {"temperature": 0.9, "top_p": 0.9, "seed": 1234, "max_new_tokens": 8}],
                         ids=["greedy", "seeded"])
def test_replay_of_a_demo_reply_is_identical(tmp_path, capsys, settings):
    engine, _, conv, reply, _ = _chat("axiom-tiny", settings)
    card = reply.run
    info = engine.info()
    assert card["engine"]["checkpoint_sha256"] == info["checkpoint_sha256"] and len(info["checkpoint_sha256"]) == 64
    assert card["engine"]["machine"]["kernels"].startswith("cpu ") and card["engine"]["quantize"] == "none"
    assert card["engine"]["compile"].startswith("eager") and card["seed"] is not None
    assert card["prompt_sha256"] == prompt_hash(engine.tokenizer.render(
        [{"role": "user", "content": "Tell me a story"}], add_generation_prompt=True, system=None))
    assert _replay(tmp_path, conv) == 0
    out = capsys.readouterr().out
    assert f"identical: {len(reply.token_ids)} of {len(reply.token_ids)} tokens" in out


def test_a_changed_checkpoint_is_named_as_the_reason(tmp_path, capsys):
    _, _, conv, reply, _ = _chat("axiom-tiny", {"temperature": 0.0, "max_new_tokens": 6})
    # As if the reply had come from other weights: another hash, and another token at 2.
    reply.run["engine"]["checkpoint_sha256"] = "f" * 64
    reply.token_ids[2] = (reply.token_ids[2] + 1) % 1000
    assert _replay(tmp_path, conv, "--message", reply.id) == 1
    out = capsys.readouterr().out
    assert "differs at token 2 of 6" in out and "likely reason: different checkpoint (recorded ffffffffffff" in out
    assert _replay(tmp_path, conv, "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["index"] == 2 and report["reasons"][0].startswith("different checkpoint")


def test_replay_refuses_what_it_cannot_replay(tmp_path, capsys):
    conv = Conversation()
    conv.add(None, "user", "hi")
    assert _replay(tmp_path, conv) == 2 and "no reply to replay" in capsys.readouterr().err
    assert _replay(tmp_path, conv, "--message", "nope") == 2 and "no message" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["replay", str(tmp_path / "bad.json")]) == 2 and "not a smollchat chat export" in capsys.readouterr().err


def test_huginn_depth_changed_mid_reply_takes_effect_at_the_next_token_and_replays(tmp_path, capsys):
    fixed = {"exit_criterion": "none", "num_steps": 2}
    _, session, conv, reply, events = _chat("huginn-tiny", {"temperature": 0.0, "max_new_tokens": 7}, fixed,
                                            channel_at=2, change={"num_steps": 5})
    # Token 2 had arrived when the change was sent: token 3 is the first computed at the new depth.
    assert [e.steps for e in events] == [2, 2, 2] + [5] * (len(events) - 3)
    assert [e.controls_changed for e in events] == [None, None, None, {"num_steps": 5}] + [None] * (len(events) - 4)
    assert reply.run["control_changes"] == [{"token": 3, "controls": {"num_steps": 5}}]
    assert reply.run["controls"]["num_steps"] == 2 and reply.run["steps"] == [e.steps for e in events]
    assert _replay(tmp_path, conv) == 0
    assert "identical" in capsys.readouterr().out
    reply.run.pop("control_changes")  # without the recorded change the demo's reply parts at token 3
    assert replay(session, conv, reply).index == 3
    with pytest.raises(ValueError, match="num_steps"):
        session.change_controls({"num_steps": -1})
    # What the state already holds is laid out by the cache strategy: it changes from the next reply only.
    with pytest.raises(ValueError, match="cache_strategy cannot change while a reply streams"):
        session.change_controls({"cache_strategy": "latest-m4"})
    channel = ControlChannel(schedule={2: {"cache_strategy": "latest-m4"}})
    with pytest.raises(ValueError, match="cache_strategy cannot change"):
        list(session.engine.generate([1, 2, 3], None, fixed, channel=channel))


def test_the_kernel_choice_and_threads_are_recorded_forced_on_replay_and_named_when_they_differ(tmp_path, capsys,
                                                                                                   monkeypatch):
    from chatapp.engine import runtime

    engine, session, conv, reply, _ = _chat("axiom-tiny", {"temperature": 0.0, "max_new_tokens": 6})
    card = reply.run["engine"]
    assert card["kernels"] == engine.info()["kernels"] and card["kernels"]["source"] == "default"
    assert card["threads"] == engine.info()["threads"] == 1  # the tests' $SMOLLCHAT_THREADS
    # The replay loads the recorded path: the kernel choice forced, the same thread count.
    loads = []
    real = runtime.load_engine
    monkeypatch.setattr(runtime, "load_engine", lambda *a, **kw: loads.append(kw) or real(*a, **kw))
    assert _replay(tmp_path, conv) == 0 and "identical" in capsys.readouterr().out
    assert loads[0]["kernels"] == card["kernels"] and loads[0]["threads"] == 1
    # Recorded on another path: named as the likely reasons (how a choice was reached is not a difference).
    now = dict(card["kernels"])
    reply.run["engine"]["kernels"] = {**now, "widening": "column/linear/linear"}
    reply.run["engine"]["threads"] = 2
    reply.token_ids[2] = (reply.token_ids[2] + 1) % 1000
    result = replay(session, conv, reply)
    assert result.index == 2 and result.reasons == [
        f"different kernel choice (recorded {now['dtype']} widening column/linear/linear, narrowing "
        f"{now['narrowing']}, now {now['dtype']} widening {now['widening']}, narrowing {now['narrowing']})",
        "different thread count (recorded 2, now 1)"]
    reply.run["engine"]["kernels"] = {**now, "source": "measured"}
    reply.run["engine"]["threads"] = 1
    assert replay(session, conv, reply).reasons[0].startswith("nothing recorded differs")


@pytest.mark.parametrize("settings", [{"temperature": 0.0, "max_new_tokens": 5},
                                      {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 5}],
                         ids=["greedy", "seeded"])
def test_a_continued_reply_replays_every_part_from_its_own_run_card(settings):
    engine, session, conv, reply, _ = _chat("axiom-tiny", settings)
    first = len(reply.token_ids)
    for _ in range(2):  # two continuations, each a call with its own card (and, unseeded, its own seed)
        events = list(session.stream(conv, reply.parent_id, continue_from=reply.id))
        assert isinstance(events[-1], Done) and events[-1].new_tokens > 0
    parts = reply.run["continued"]
    assert len(parts) == 2 and len(reply.token_ids) == first + sum(p["new_tokens"] for p in parts)
    result = replay(session, conv, reply)
    assert result.identical and result.compared == len(reply.token_ids) and result.prompt_same
    # A token of the second continuation changed: the replay names it, counted in the whole reply.
    at = first + parts[0]["new_tokens"] + 1
    assert at < len(reply.token_ids)
    reply.token_ids[at] = (reply.token_ids[at] + 1) % 1000
    result = replay(session, conv, reply)
    assert not result.identical and result.index == at

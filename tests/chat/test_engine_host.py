"""The engine in a child process (chat/engine_host.py) against the same engine in this process: the same
events, cancel, live control changes, errors and a child that dies, through the chat Session."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatapp.chat.conversation import Conversation
from chatapp.chat.engine_host import MEMORY_FRESH_S, Build, EngineHost, EngineProcessError, _rebuild
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, FakeTokenizer
from chatapp.chat.session import Session
from chatapp.contract import INSPECT_DETAIL, ControlChannel, ControlSpec, Done, SamplingSettings

REPLY = "Hello **there**, a reply of a few words.\n\n```python\nprint('hi')\n```\n\nThe end."


def _host(replies=(REPLY,), **kw) -> EngineHost:
    # A byte tokenizer: its ids mean the same in both processes (a word tokenizer numbers words as it meets them).
    return EngineHost(Build(FakeEngine, (list(replies),), {"tokenizer": FakeTokenizer("bytes"), **kw}))


def _untimed(events):
    return [dataclasses.replace(e, t_ns=0) if not isinstance(e, Done) else e for e in events]


@pytest.fixture
def hosts():
    made: list[EngineHost] = []

    def make(*a, **kw):
        made.append(_host(*a, **kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_the_child_streams_what_the_engine_streams_in_process(hosts):
    kw = dict(controls=HUGINN_LIKE_CONTROLS, context_limit=512)
    local = FakeEngine([REPLY], tokenizer=FakeTokenizer("bytes"), **kw)
    host = hosts(**kw)
    assert host.entry == local.entry and host.context_limit == 512
    assert [dataclasses.replace(s, check=None) for s in host.controls] == list(local.controls)
    assert {k: v for k, v in host.info().items() if k != "engine_process"} == local.info()
    ids = local.tokenizer.encode("a prompt")
    assert host.tokenizer.encode("a prompt") == ids
    settings = SamplingSettings(max_new_tokens=200, stop_strings=("print",))
    for detail in (INSPECT_DETAIL, INSPECT_DETAIL.__class__()):
        here = list(local.generate(ids, settings, {"num_steps": 5}, detail=detail))
        there = list(host.generate(ids, settings, {"num_steps": 5}, detail=detail))
        assert _untimed(there) == _untimed(here)
        assert there[-1].stop_reason == "stop_string" and there[0].steps == 5
    assert host.memory() == local.memory()  # the child's state saw the same prompts
    with pytest.raises(ValueError, match="unknown control 'depth'"):
        list(host.generate(ids, settings, {"depth": 3}))  # the child's own error, same type and words


def test_a_session_on_the_child_records_the_reply_as_in_process(hosts):
    replies = {}
    for name, engine in (("here", FakeEngine([REPLY], tokenizer=FakeTokenizer("bytes"))), ("child", hosts())):
        conv = Conversation()
        session = Session(engine)
        events = list(session.stream(conv, conv.add(None, "user", "hi").id))
        reply = conv.path()[-1]
        replies[name] = (reply.content, reply.token_ids, reply.status, reply.run["stop_reason"],
                         reply.run["tokens"], len(events))
    assert replies["child"] == replies["here"]
    assert replies["child"][0] == REPLY and replies["child"][2] == "ok"


def test_cancel_reaches_the_child_between_tokens(hosts):
    # One token a second: the cancel arrives while the child waits for the next one.
    host = hosts(instant=False, tokens_per_s=1.0, ttft_s=0.0)
    ids = host.tokenizer.encode("x")
    cancel = threading.Event()
    seen = []
    for ev in host.generate(ids, SamplingSettings(max_new_tokens=50), cancel=cancel):
        seen.append(ev)
        cancel.set()
    assert seen[-1].stop_reason == "cancelled" and seen[-1].new_tokens == 1 and len(seen) == 2
    # Set before the call starts (a long time to first token): nothing is generated.
    host2 = hosts(instant=False, tokens_per_s=1.0, ttft_s=30.0)
    early = threading.Event()
    early.set()
    out = list(host2.generate(ids, SamplingSettings(), cancel=early))
    assert len(out) == 1 and out[0].stop_reason == "cancelled" and out[0].new_tokens == 0
    # engine.cancel() stops whichever call runs in the child; a consumer that stops listening stops it too.
    events = host.generate(ids, SamplingSettings(max_new_tokens=50))
    next(events)
    host.cancel()
    assert list(events)[-1].stop_reason == "cancelled"


def test_live_control_changes_reach_the_child(hosts):
    host = hosts(replies=("one two three four five six seven eight",), controls=HUGINN_LIKE_CONTROLS,
                 instant=False, tokens_per_s=20.0, ttft_s=0.0)
    conv = Conversation()
    session = Session(host)
    channel = ControlChannel()
    events = session.stream(conv, conv.add(None, "user", "hi").id, channel=channel)
    steps = [next(events).steps]
    session.change_controls({"num_steps": 7})
    for ev in events:
        if not isinstance(ev, Done):
            steps.append(ev.steps)
    changed_at = steps.index(7)
    assert steps[0] == 32 and changed_at >= 1 and set(steps[changed_at:]) == {7}
    assert conv.path()[-1].run["control_changes"] == [{"token": changed_at, "controls": {"num_steps": 7}}]
    with pytest.raises(ValueError, match="num_steps"):
        session.change_controls({"num_steps": 1000})  # checked here, before anything is sent


def test_a_control_checked_by_the_architecture_is_checked_in_the_child(hosts):
    spec = ControlSpec("ring", "Ring", "str", "8", check=int)  # any callable the child can import
    host = hosts(controls=(spec,))
    checked = host.controls[0]
    assert checked.coerce("16") == "16"
    with pytest.raises(ValueError, match="control 'ring': invalid literal for int"):
        checked.coerce("sixteen")


def test_errors_in_the_child_come_back_as_the_same_errors(hosts):
    host = hosts(error_after=3, error_message="scripted engine failure")
    conv = Conversation()
    events = Session(host).stream(conv, conv.add(None, "user", "hi").id)
    got = []
    with pytest.raises(RuntimeError, match="scripted engine failure") as e:
        for ev in events:
            got.append(ev.text)
    assert type(e.value) is RuntimeError and "chat/fake.py" in e.value.remote_traceback
    reply = conv.path()[-1]
    assert reply.status == "error" and reply.content == "".join(got) == REPLY[:len(reply.content)]
    assert reply.run["error"] == "RuntimeError: scripted engine failure"
    with pytest.raises(TypeError, match="bogus"):
        EngineHost(Build(FakeEngine, (), {"bogus": 1}))  # a load error is the load's own
    # A class that cannot be imported here without torch keeps its name and its built-in base.
    err = _rebuild(("chatapp.engine.runtime", "NonFiniteOutput", "the model's first logits are NaN", "RuntimeError", ""))
    assert type(err).__name__ == "NonFiniteOutput" and isinstance(err, RuntimeError)
    assert f"{type(err).__name__}: {err}" == "NonFiniteOutput: the model's first logits are NaN"


def test_a_child_that_dies_mid_reply_ends_it_with_a_clear_error_and_keeps_the_text(hosts):
    host = hosts(replies=("a b c d e f g h i j k l",), instant=False, tokens_per_s=5.0, ttft_s=0.0)
    conv = Conversation()
    events = Session(host).stream(conv, conv.add(None, "user", "hi").id)
    first = next(events)
    os.kill(host.pid, signal.SIGKILL)
    with pytest.raises(EngineProcessError, match=r"engine process was killed \(SIGKILL\); load the model again"):
        for _ in events:
            pass
    reply = conv.path()[-1]
    assert reply.status == "error" and reply.content.startswith(first.text) and reply.content
    assert "SIGKILL" in reply.run["error"]
    with pytest.raises(EngineProcessError, match="SIGKILL"):
        list(host.generate([1, 2], SamplingSettings()))  # at once, not hung
    assert host.memory().weights == 12_000_000  # the last report stands (the panels ask from the UI thread)


def test_memory_asked_while_a_reply_streams_takes_the_answer_later_instead_of_waiting(hosts):
    # The generation worker asks with every batch; waiting would stop it taking tokens (the answer queues
    # behind the reply's events).
    reply = " ".join(["w"] * 300)
    host = hosts(replies=(reply,), instant=False, tokens_per_s=150.0, ttft_s=0.0)
    local = FakeEngine([reply], tokenizer=FakeTokenizer("bytes"))
    list(local.generate(local.tokenizer.encode("hi"), SamplingSettings(max_new_tokens=300)))
    before = host.memory()
    time.sleep(MEMORY_FRESH_S)  # the report is stale now: a call without a reply streaming would ask and wait
    events = host.generate(host.tokenizer.encode("hi"), SamplingSettings(max_new_tokens=300))
    next(events)  # the child has taken the prompt: a fresh report would count it
    assert host.memory() == before  # the last report, at once; a fresh one is asked for
    fresh = None
    for event in events:
        report = host.memory()
        if report != before:
            fresh = report
            break
    assert fresh is not None and fresh.context_used > before.context_used  # taken while the reply streamed
    for _ in events:
        pass
    time.sleep(MEMORY_FRESH_S)
    assert host.memory() == local.memory()  # after the reply: asked and waited for, as before


def test_closing_the_host_ends_the_child(hosts):
    host = hosts()
    pid = host.pid
    host.close()
    host.close()
    with pytest.raises(EngineProcessError, match="closed"):
        list(host.generate([1], SamplingSettings()))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


DEMO = """
import json, sys
from chatapp.catalog import load_catalog
from chatapp.chat.engine_host import load_engine_process
from chatapp.contract import SamplingSettings, TokenDetail
host = load_engine_process(load_catalog()["axiom-tiny"])
ids = host.tokenizer.encode("Hello there")
events = list(host.generate(ids, SamplingSettings(temperature=0.8, seed=7, max_new_tokens=12), None,
                            detail=TokenDetail(logprob=True)))
print(json.dumps({"ids": ids, "tokens": [e.token_id for e in events[:-1]], "text": "".join(e.text for e in events[:-1]),
                  "logprob": [e.logprob for e in events[:-1]], "stop": events[-1].stop_reason,
                  "info": host.info()["model_id"], "torch": "torch" in sys.modules}))
host.close()
"""


def test_a_demo_model_in_a_child_gives_the_in_process_tokens_and_torch_stays_out_of_the_parent(tmp_path):
    """axiom-tiny loaded by the engine process from a fresh interpreter (this one has torch already)."""
    env = {**os.environ, "SMOLLCHAT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", DEMO], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["info"] == "axiom-tiny"
    from chatapp.catalog import load_catalog
    from chatapp.contract import TokenDetail
    from chatapp.engine.runtime import load_engine

    engine = load_engine(load_catalog()["axiom-tiny"])
    assert engine.tokenizer.encode("Hello there") == got["ids"]
    here = list(engine.generate(got["ids"], SamplingSettings(temperature=0.8, seed=7, max_new_tokens=12), None,
                                detail=TokenDetail(logprob=True)))
    assert [e.token_id for e in here[:-1]] == got["tokens"] and here[-1].stop_reason == got["stop"]
    assert "".join(e.text for e in here[:-1]) == got["text"]
    assert [e.logprob for e in here[:-1]] == got["logprob"]  # the same code on the same machine: bit for bit

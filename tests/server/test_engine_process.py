"""`smollchat serve` on an engine in its own process (chat/engine_host.py, the same mechanism as the
TUI's): a chat completion answers from the child, and unloading the model ends the child."""
from __future__ import annotations

import json
import os

import pytest

from chatapp.chat.engine_host import Build, EngineHost
from chatapp.chat.fake import FakeEngine, FakeTokenizer, fake_entry
from chatapp.server import ModelPool, create_app

from .conftest import Uvicorn
from .test_http import CHAT, _request

REPLY = "An answer computed in another process."


def test_a_served_model_answers_from_its_own_process_and_unloading_ends_it():
    entry = fake_entry("fake-served")
    hosts: list[EngineHost] = []

    def load(e, _progress):
        hosts.append(EngineHost(Build(FakeEngine, ([REPLY],), {"entry": e, "tokenizer": FakeTokenizer("bytes")})))
        return hosts[-1]

    pool = ModelPool({entry.id: entry}, load, max_loaded=1)
    pool.preload(entry.id)
    server = Uvicorn(create_app(pool))
    try:
        body = {"model": entry.id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
        status, answer = _request(f"http://127.0.0.1:{server.port}", "POST", CHAT, json.dumps(body),
                                  {"Content-Type": "application/json"})
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == REPLY
        assert answer["choices"][0]["finish_reason"] == "stop"
    finally:
        server.stop()
        pool.close()
    with pytest.raises(ProcessLookupError):
        os.kill(hosts[0].pid, 0)

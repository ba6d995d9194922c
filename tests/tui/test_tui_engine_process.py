"""The TUI on an engine in its own process (chat/engine_host.py), loaded by the load worker as a real
model is: the reply streams and stops as in-process, the memory panel reads the child, loading
another model ends the first child when the pool's budget has no room for both (and keeps it loaded
when it has: chat/pool.py), and a child killed mid-reply leaves the reply marked with the error."""
from __future__ import annotations

import os
import signal

import pytest

from chatapp.chat.engine_host import Build, EngineHost
from chatapp.chat.fake import FakeEngine, FakeTokenizer
from chatapp.chat.pool import rough_footprint

from .conftest import SIZE, wait_until
from .test_tui_models import open_models

pytestmark = pytest.mark.asyncio

LONG = " ".join(f"word{i}" for i in range(400))


@pytest.mark.parametrize("room_for_both", [False, True])
async def test_a_model_in_its_own_process_streams_stops_and_is_ended_when_another_needs_its_room(
        build, store, catalog, room_for_both):
    hosts: list[EngineHost] = []

    def loader(entry, progress, quantize=None):
        build_fake = Build(FakeEngine, ([LONG],), {"entry_id": entry.id, "tokenizer": FakeTokenizer("bytes"),
                                                  "instant": False, "tokens_per_s": 100, "ttft_s": 0.0,
                                                  "context_limit": 4096})
        hosts.append(EngineHost(build_fake, progress))
        return hosts[-1]

    need = max(rough_footprint(catalog[m]).total for m in ("genesis-tiny", "odinnext-tiny"))
    app = build(engine=None, loader=loader, memory_budget=need * (3 if room_for_both else 1) + need // 2)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await open_models(pilot, "genesis-tiny")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.entry_id == "genesis-tiny", timeout=60, what="the load")
            assert app.info["engine_process"] == hosts[0].pid
            app.chat_screen.conv.settings["max_new_tokens"] = 2000
            app.chat_screen.composer.insert("go")
            app.chat_screen.composer.action_send()
            await wait_until(pilot, lambda: len(app.chat_screen.conv.messages) == 2
                             and len(app.chat_screen.conv.path()[-1].content) > 20, what="some streamed text")
            await pilot.press("escape")
            await wait_until(pilot, lambda: app.chat_screen.streaming is None, what="the stop")
            reply = app.chat_screen.conv.path()[-1]
            assert reply.status == "stopped" and reply.run["stop_reason"] == "cancelled"
            assert 20 < len(reply.content) < len(LONG) and LONG.startswith(reply.content)
            assert store.load(app.chat_screen.conv.id).get(reply.id).status == "stopped"
            memory = app.session.memory()  # the child's FakeEngine: its state holds the prompt and the reply
            assert (memory.weights, memory.context_limit) == (12_000_000, 4096)
            assert memory.context_used >= len(reply.token_ids)
            first = hosts[0].pid
            await open_models(pilot, "odinnext-tiny")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.entry_id == "odinnext-tiny", timeout=60, what="the second load")
            if room_for_both:
                os.kill(first, 0)  # the pool keeps the first model loaded (idle, within the budget)
                assert app.pool.holds(hosts[0])
            else:
                with pytest.raises(ProcessLookupError):
                    os.kill(first, 0)  # its room was needed: the first model's process ended
            # The second model's process dies mid-reply: the reply keeps its text, marked with the error.
            app.chat_screen.composer.insert("again")
            app.chat_screen.composer.action_send()
            await wait_until(pilot, lambda: app.chat_screen.streaming and len(app.chat_screen.conv.path()[-1].content) > 20,
                             what="the second reply streaming")
            os.kill(hosts[1].pid, signal.SIGKILL)
            await wait_until(pilot, lambda: app.chat_screen.streaming is None, what="the reply to end")
            reply = app.chat_screen.conv.path()[-1]
            assert reply.status == "error" and LONG.startswith(reply.content) and len(reply.content) > 20
            assert "engine process was killed (SIGKILL)" in reply.run["error"]
            view = app.chat_screen.view.view_for(reply.id)
            assert "SIGKILL" in str(view.query_one(".stats").render())
            assert app.session.memory().weights == 12_000_000  # the panels still read the last report
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)  # every engine the pool held ends with the app
    finally:
        for h in hosts:
            h.close()

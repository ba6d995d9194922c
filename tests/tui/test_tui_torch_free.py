"""The TUI never imports torch: start the app on the FakeEngine, stream a reply, open the other
screens, all in a fresh interpreter (other tests import torch into the test process); and (slow) a real
demo model loaded by the app's default loader runs in its own process, leaving the app torch-free."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TORCH_FREE = """
import asyncio, sys
from chatapp.chat.fake import FakeEngine, FakeDownloader
from chatapp.tui.app import make_app

async def main():
    app = make_app(engine=FakeEngine(["streamed without torch"]), downloader=FakeDownloader())
    async with app.run_test(size=(100, 30)) as pilot:
        app.chat_screen.composer.insert("hi")
        await pilot.press("enter")
        for _ in range(200):
            if app.chat_screen.streaming is None and len(app.chat_screen.conv.messages) == 2:
                break
            await pilot.pause(0.02)
        print(app.chat_screen.conv.path()[-1].content)
        await pilot.press("ctrl+o", "escape", "f1", "escape")
    print("torch" in sys.modules)

asyncio.run(main())
"""


def test_the_app_starts_and_streams_without_importing_torch(tmp_path):
    """In a fresh interpreter (other tests import torch into this one): start, stream, open screens."""
    env = {**os.environ, "SMOLLCHAT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["streamed without torch", "False"]


REAL_MODEL = """
import asyncio, sys
from chatapp.chat.fake import FakeDownloader
from chatapp.tui.app import make_app

async def main():
    app = make_app(model_id="axiom-tiny", downloader=FakeDownloader())  # the default loader: an engine process
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(3000):
            if app.session is not None:
                break
            await pilot.pause(0.05)
        app.chat_screen.conv.settings.update(max_new_tokens=6, temperature=0)
        app.chat_screen.composer.insert("hi")
        app.chat_screen.composer.action_send()
        for _ in range(3000):
            if app.chat_screen.streaming is None and len(app.chat_screen.conv.messages) == 2:
                break
            await pilot.pause(0.05)
        reply = app.chat_screen.conv.path()[-1]
        print(reply.status, len(reply.token_ids), app.info["engine_process"] > 0)
    print("torch" in sys.modules)

asyncio.run(main())
"""


@pytest.mark.slow
def test_a_real_model_runs_in_its_own_process_and_the_app_never_imports_torch(tmp_path):
    """axiom-tiny through the app's default loader, in a fresh interpreter: it loads and answers, and
    only the engine's process imports torch."""
    env = {**os.environ, "SMOLLCHAT_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", REAL_MODEL], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["ok 6 True", "False"]

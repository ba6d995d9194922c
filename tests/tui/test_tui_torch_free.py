"""The TUI never imports torch: start the app on the FakeEngine, stream a reply, open the other
screens, all in a fresh interpreter (other tests import torch into the test process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

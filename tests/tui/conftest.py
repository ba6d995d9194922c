"""TUI test helpers: an app on the FakeEngine with a temporary store, and `wait_until`.

Nothing here imports torch; the app is built by the same `make_app` factory as the CLI uses.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

from chatapp.catalog import load_catalog
from chatapp.chat.fake import FakeDownloader, FakeEngine
from chatapp.chat.store import Store
from chatapp.tui.app import make_app

#: Snapshot and flow tests run at this terminal size unless they say otherwise.
SIZE = (120, 36)
#: The chat list's clock in tests: every chat reads "now".
FIXED_CLOCK = 0.0
#: The model pool's memory budget in tests (the default follows the machine's memory).
BUDGET = 8 * 2**30


def ghost_fake(*args: Any, n_layers: int = 12, hidden_size: int = 768, **kw: Any) -> FakeEngine:
    """A FakeEngine that also reports depth and width, as Engine.info() does, for the KV ghost line."""
    return FakeEngine(*args, n_layers=n_layers, hidden_size=hidden_size, params=138_000_000, **kw)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "chats.sqlite3")
    yield s
    s.close()


@pytest.fixture
def catalog():
    return load_catalog()


@pytest.fixture
def build(store, catalog):
    """build(engine=..., **make_app kwargs) -> app on a temp store, the real catalog, a FakeDownloader."""
    def factory(engine: Any = "default", **kw: Any):
        if engine == "default":
            engine = FakeEngine()
        kw.setdefault("downloader", FakeDownloader())
        kw.setdefault("keymap", {})
        kw.setdefault("clock", lambda: FIXED_CLOCK)
        kw.setdefault("memory_budget", BUDGET)
        return make_app(engine=engine, catalog=kw.pop("catalog", catalog), store=kw.pop("store", store), **kw)
    return factory


async def wait_until(pilot, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Let the app run until `predicate()` holds (workers and message handlers need real turns)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.02)
    await pilot.pause()


async def send(pilot, text: str) -> None:
    """Type a prompt into the composer and press Enter, then wait for the reply to finish."""
    app = pilot.app
    app.chat_screen.composer.focus()
    app.chat_screen.composer.insert(text)
    await pilot.press("enter")
    await wait_until(pilot, lambda: app.chat_screen.streaming is None and _last_role(app) == "assistant",
                     what="the reply")


def _last_role(app) -> str | None:
    conv = app.chat_screen.conv
    path = conv.path() if conv and conv.current_leaf else []
    return path[-1].role if path else None


def still(app) -> None:
    """No blinking cursors, so screenshots are stable."""
    for widget in app.screen.query("TextArea, Input"):
        widget.cursor_blink = False


async def settle(pilot) -> None:
    await pilot.pause()
    await asyncio.sleep(0.05)
    await pilot.pause()

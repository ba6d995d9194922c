"""A `smollchat serve` app on 127.0.0.1 for the server tests: axiom-tiny preloaded, huginn-tiny loading
lazily (its controls), recording into a chat store of its own. One per test module (loading is slow)."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_BENCH = Path(__file__).resolve().parents[2] / "bench"

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    pool: Any
    store: Any
    home: Path

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    def engine(self, model_id: str) -> Any:
        return self.pool.slots[model_id].engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Uvicorn:
    """uvicorn serving `app` on a loopback port in a thread, until stop()."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLLCHAT_HOME", str(home))  # demo checkpoints and the store in here, not the user's dirs
        mp.setenv("HF_HOME", str(home / "hf"))
        from chatapp.catalog import load_catalog
        from chatapp.chat.store import Store
        from chatapp.engine.runtime import load_engine
        from chatapp.server import ModelPool, create_app
        from chatapp.server.record import Recorder

        entries = {k: e for k, e in load_catalog().items() if k in ("axiom-tiny", "huginn-tiny")}
        pool = ModelPool(entries, lambda e, _p: load_engine(e, device="cpu"), budget=2**30)
        pool.preload("axiom-tiny")
        store = Store(home / "served.sqlite3")
        server = Uvicorn(create_app(pool, recorder=Recorder(store)))
        try:
            yield Running(f"http://127.0.0.1:{server.port}", pool, store, home)
        finally:
            server.stop()
            pool.close()
            store.close()


def wait_ready(running: Running, model_id: str, seconds: float = 180) -> None:
    """Ask for the model until it is loaded (the first ask starts the load)."""
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{running.base}/chat/completions", body), timeout=60):
                return
        except urllib.error.HTTPError as e:
            assert e.code == 503 and e.headers.get("Retry-After"), e.read()
            assert time.monotonic() < deadline, f"{model_id} did not load"
            time.sleep(0.5)

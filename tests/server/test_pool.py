"""The served-model pool: first come first served per model, cancelled jobs skipped, lazy loads answered
503 until ready, failed loads reported then retried, least recently used idle model unloaded."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from chatapp.chat.fake import FakeEngine, fake_entry
from chatapp.chat.pool import Job, ModelPool, PoolError


def _entries(*ids: str) -> dict:
    return {i: fake_entry(i) for i in ids}


def _ready(pool: ModelPool, model_id: str, seconds: float = 10):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return pool.slot(model_id)
        except PoolError as e:
            assert e.status == 503 and e.retry_after and time.monotonic() < deadline, e
            time.sleep(0.01)


def test_jobs_run_in_arrival_order_and_cancelled_ones_are_skipped():
    pool = ModelPool(_entries("a"), lambda e, _p: FakeEngine(entry=e))
    pool.preload("a")
    slot = pool.slot("a")
    gate, order, skipped = threading.Event(), [], []
    pool.submit(slot, Job(lambda eng: gate.wait(10)))  # holds the worker while the others queue up
    jobs = [Job(lambda eng, i=i: order.append(i), skipped=lambda i=i: skipped.append(i)) for i in range(8)]
    for job in jobs:
        pool.submit(slot, job)
    jobs[3].cancel.set()  # its client left while it waited
    gate.set()
    deadline = time.monotonic() + 10
    while len(order) + len(skipped) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert order == [0, 1, 2, 4, 5, 6, 7] and skipped == [3]
    assert pool.health()["a"]["skipped"] == 1
    pool.close()


def test_unknown_model_is_404():
    pool = ModelPool(_entries("a"), lambda e, _p: FakeEngine(entry=e))
    with pytest.raises(PoolError) as e:
        pool.slot("b")
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_lazy_load_answers_503_until_ready_and_a_failed_load_is_retried():
    release, attempts = threading.Event(), []

    def load(entry, progress):
        attempts.append(entry.id)
        release.wait(10)
        if len(attempts) == 1:
            raise OSError("disk on fire")
        return FakeEngine(entry=entry)

    pool = ModelPool(_entries("a"), load)
    for _ in range(3):  # asked again while loading: still one load
        with pytest.raises(PoolError) as e:
            pool.slot("a")
        assert e.value.status == 503 and e.value.code == "model_loading"
    release.set()
    deadline = time.monotonic() + 10
    while pool.health()["a"]["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(PoolError) as e:
        pool.slot("a")
    assert e.value.status == 500 and "disk on fire" in str(e.value)
    assert _ready(pool, "a").engine is not None and attempts == ["a", "a"]
    pool.close()


def test_least_recently_used_idle_model_unloads_to_make_room():
    pool = ModelPool(_entries("a", "b", "c"), lambda e, _p: FakeEngine(entry=e), max_loaded=2)
    pool.preload("a")
    pool.preload("b")
    pool.slot("a")  # a is now the most recently used
    _ready(pool, "c")
    assert set(pool.health()) == {"a", "c"}
    busy = threading.Event()
    pool.submit(pool.slot("a"), Job(lambda eng: busy.wait(10)))
    pool.submit(pool.slot("c"), Job(lambda eng: busy.wait(10)))
    with pytest.raises(PoolError) as e:
        pool.slot("b")  # both loaded models are busy: none can be unloaded
    assert e.value.status == 503 and e.value.code == "pool_busy"
    busy.set()
    pool.close()


def test_serve_refuses_a_non_loopback_bind_without_a_key():
    env = {k: v for k, v in os.environ.items() if k != "SMOLLCHAT_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "chatapp", "serve", "--host", "0.0.0.0"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "SMOLLCHAT_API_KEY" in r.stderr and "--api-key-file" in r.stderr


def test_the_server_loads_within_the_memory_budget_and_refuses_a_model_too_big_for_it():
    import json
    import urllib.error
    import urllib.request

    from chatapp.chat.pool import Footprint
    from chatapp.server import create_app

    from .conftest import Uvicorn

    sizes = {"small": 40, "other": 40, "big": 200}
    pool = ModelPool(_entries(*sizes), lambda e, _p: FakeEngine(entry=e), budget=100 * 2**20,
                     estimate=lambda e: Footprint(sizes[e.id] * 2**20, 0))
    server = Uvicorn(create_app(pool))
    base = f"http://127.0.0.1:{server.port}"

    def chat(model: str) -> tuple[int, dict]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/chat/completions", body), timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        status, body = chat("big")
        assert status == 507 and body["error"]["code"] == "model_too_large"
        assert "budget is 100.0 MiB" in body["error"]["message"] and "--memory-budget" in body["error"]["message"]
        for model in ("small", "other", "small"):
            deadline = time.monotonic() + 10
            while (got := chat(model))[0] == 503:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert got[0] == 200, got
        with urllib.request.urlopen(f"{base}/health", timeout=60) as r:
            health = json.loads(r.read())
        assert health["memory"] == {"budget": 100 * 2**20, "used": pool.usage().used}
        assert set(health["models"]) == {"small", "other"}  # 80 of 100 MiB: both stay loaded
    finally:
        server.stop()
        pool.close()


def test_serve_says_how_to_write_a_memory_budget():
    r = subprocess.run([sys.executable, "-m", "chatapp", "serve", "--memory-budget", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--memory-budget" in r.stderr and "8GiB" in r.stderr

"""`smollchat web`: the page fetches nothing from other hosts, the key and Host rules hold, and a real
browser (Debian's chromium driven by Playwright) chats with a demo model through it.

The browser test skips with its reason when Playwright or a chromium binary is missing; `.ci/run`
installs chromium. Set SMOLLCHAT_WEB_SCREENSHOT=PATH to keep its screenshot (docs/web.png was made so).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from chatapp.cli.web import page_template

KEY = "k" * 8 + "-web-test-key"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def web_server(*flags: str, env: dict[str, str] | None = None):
    """`smollchat web` in a child process on a free loopback port; yields (port, the child)."""
    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server's request log
    child = subprocess.Popen([sys.executable, "-m", "chatapp", "web", "--port", str(port), *flags],
                             env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise AssertionError(f"smollchat web did not start: {log.read().decode()}")
                time.sleep(0.1)
        yield port, child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode("utf-8", "replace"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace"), dict(e.headers)


def test_page_template_links_nothing_remote():
    page = page_template()
    assert "fonts.googleapis" not in page and "@font-face" in page
    urls = re.findall(r"https?://[^\s\"'<>)]+", page)
    assert urls == ["http://www.w3.org/2000/svg"]  # an XML namespace, never fetched


def test_served_page_and_font_are_local():
    with web_server("--fake") as (port, _):
        status, page, _ = _get(f"http://127.0.0.1:{port}/")
        assert status == 200
        fetched = set(re.findall(r"(?:src|href)=\"([^\"]+)\"", page)) | set(re.findall(r"url\(\"([^\"]+)\"\)", page))
        assert fetched and all(u.startswith(f"http://127.0.0.1:{port}/static/") for u in fetched), fetched
        font = next(u for u in fetched if u.endswith(".ttf"))
        with urllib.request.urlopen(font, timeout=30) as r:
            assert r.status == 200 and len(r.read()) > 10_000


def test_foreign_host_header_and_websocket_origin_are_refused():
    with web_server("--fake") as (port, _):
        assert _get(f"http://127.0.0.1:{port}/", {"Host": f"rebound.example:{port}"})[0] == 421
        assert _get(f"http://127.0.0.1:{port}/", {"Host": f"localhost:{port}"})[0] == 200
        ws = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        assert _get(f"http://127.0.0.1:{port}/ws", {**ws, "Origin": "http://evil.example"})[0] == 403


def test_a_key_is_required_once_set_and_then_kept_in_a_cookie():
    with web_server("--fake", env={"SMOLLCHAT_API_KEY": KEY}) as (port, _):
        status, body, _ = _get(f"http://127.0.0.1:{port}/")
        assert status == 401 and "?key=" in body
        assert _get(f"http://127.0.0.1:{port}/?key=wrong-key-of-enough-length")[0] == 401
        status, _, headers = _get(f"http://127.0.0.1:{port}/?key={KEY}")
        assert status == 200 and "smollchat_key=" in headers.get("Set-Cookie", "")
        assert "HttpOnly" in headers["Set-Cookie"]
        assert _get(f"http://127.0.0.1:{port}/static/css/xterm.css", {"Cookie": f"smollchat_key={KEY}"})[0] == 200
        assert _get(f"http://127.0.0.1:{port}/static/css/xterm.css")[0] == 401


def test_open_starts_the_browser_on_the_printed_url(tmp_path):
    opened = tmp_path / "opened"
    # webbrowser runs $BROWSER with the URL for %s: a stand-in browser that writes down what it was given.
    browser = f"{sys.executable} -c \"import sys; open({str(opened)!r}, 'w').write(sys.argv[1])\" %s"
    with web_server("--fake", "--open", env={"BROWSER": browser}) as (port, _):
        deadline = time.monotonic() + 30
        while not opened.exists() or not opened.read_text():
            assert time.monotonic() < deadline, "--open did not start the browser"
            time.sleep(0.1)
        assert opened.read_text() == f"http://127.0.0.1:{port}/"


def test_non_loopback_bind_without_a_key_is_refused_before_binding():
    env = {k: v for k, v in os.environ.items() if k != "SMOLLCHAT_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "chatapp", "web", "--host", "0.0.0.0", "--port", str(_free_port())],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "SMOLLCHAT_API_KEY" in r.stderr and "--api-key-file" in r.stderr


def _browser() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed (pip install "
                        "playwright)")
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium binary on PATH (Debian: apt-get install -y chromium); Playwright cannot download "
                "its own browser here")


def _last_reply(db: Path) -> tuple[str, str] | None:
    if not db.exists():
        return None
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = con.execute("SELECT status, content FROM messages WHERE role = 'assistant' "
                          "ORDER BY created_at DESC LIMIT 1").fetchone()
    except sqlite3.OperationalError:
        return None  # the app has not made its tables yet
    finally:
        con.close()
    return row


def test_chat_in_a_real_browser(tmp_path):
    chromium = _browser()
    from playwright.sync_api import sync_playwright

    db = Path(os.environ["SMOLLCHAT_HOME"]) / "data" / "chats.sqlite3"
    frames: list[str] = []
    requests: list[str] = []
    with web_server("--model", "axiom-tiny") as (port, _), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("request", lambda r: requests.append(r.url))
            page.on("websocket", lambda ws: ws.on(
                "framereceived", lambda f: frames.append(f if isinstance(f, str) else f.decode("utf-8", "replace"))))

            def screen_text() -> str:
                return ANSI.sub("", "".join(frames))

            def wait_for(what, seconds: float, why: str):
                deadline = time.monotonic() + seconds
                while not (found := what()):
                    assert time.monotonic() < deadline, why
                    page.wait_for_timeout(250)  # (not time.sleep: Playwright delivers events while it waits)
                return found

            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body.-first-byte", timeout=60_000)
            wait_for(lambda: "params ·" in screen_text(), 180, "the demo model never showed as loaded")
            page.locator(".xterm-helper-textarea").focus()  # the terminal's keyboard input, no click on the app
            page.keyboard.type("Hello from a browser")
            page.keyboard.press("Enter")
            status, reply = wait_for(lambda: (r := _last_reply(db)) and r[0] != "streaming" and r, 300,
                                     "the reply never finished")
            assert status == "ok" and reply.strip()
            wait_for(lambda: "tokens ·" in screen_text(), 30, "the reply's figures never reached the browser")
            assert reply.split()[0] in screen_text()
            assert "Hello from a browser" in screen_text()
            page.wait_for_timeout(500)
            shot = tmp_path / "web.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if keep := os.environ.get("SMOLLCHAT_WEB_SCREENSHOT"):
                shutil.copyfile(shot, keep)
        finally:
            browser.close()
    # Every request the page made went to this server (fonts included): nothing left the machine.
    assert requests and all(u.startswith(f"http://127.0.0.1:{port}/") for u in requests), requests

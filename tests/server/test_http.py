"""`smollchat serve` over raw HTTP: bad input gets OpenAI's error shape with the right status, slow and
vanishing clients do not hold the server, a disconnect stops the generation, the key rule holds."""
from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from chatapp.server import create_app
from chatapp.server.schema import MAX_BODY_BYTES

from .conftest import Uvicorn

CHAT = "/v1/chat/completions"


def _request(served, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None,
             ) -> tuple[int, dict]:
    u = urlsplit(served.url if hasattr(served, "url") else served)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=headers or {})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def _chat(served, **fields) -> tuple[int, dict]:
    body = {"model": "axiom-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    return _request(served, "POST", CHAT, json.dumps(body), {"Content-Type": "application/json"})


def _error(status_body: tuple[int, dict], status: int, param: str | None = None, code: str | None = None) -> str:
    got, body = status_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def test_malformed_json_and_non_objects(served):
    _error(_request(served, "POST", CHAT, "{bad json"), 400, code="invalid_json")
    _error(_request(served, "POST", CHAT, b"\xff\xfe\x00"), 400, code="invalid_json")
    _error(_request(served, "POST", CHAT, "[1, 2]"), 400)
    _error(_request(served, "POST", CHAT, ""), 400, code="invalid_json")
    _error(_request(served, "POST", CHAT, "[" * 100_000 + "]" * 100_000), 400, code="invalid_json")


@pytest.mark.parametrize("fields, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": -1}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"seed": -3}, "seed"), ({"seed": "7"}, "seed"), ({"stop": 5}, "stop"), ({"stop": ["a"] * 5}, "stop"),
    ({"messages": "hi"}, "messages"), ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]},
                                                                      "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"stream": "yes"}, "stream"), ({"model": 3}, "model"), ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"smollchat": {"warp": 1}}, "smollchat"), ({"smollchat": {"top_k": "x"}}, "top_k"),
    ({"smollchat": {"controls": []}}, "controls"), ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_wrong_types_and_ranges_name_the_parameter(served, fields, param):
    _error(_chat(served, **fields), 400, param=param)


def test_completions_input_checks(served):
    def post(**fields):
        return _request(served, "POST", "/v1/completions", json.dumps({"model": "axiom-tiny", **fields}))
    _error(post(), 400, param="prompt")
    _error(post(prompt=[1, 2, 3]), 400, param="prompt")
    _error(post(prompt="x", echo=True), 400, param="echo")
    _error(post(prompt="x", logprobs=6), 400, param="logprobs")
    _error(post(prompt="x " * 400), 400, code="context_length_exceeded")


def test_context_too_long_says_the_counts(served):
    msg = _error(_chat(served, messages=[{"role": "user", "content": "word " * 400}]), 400,
                 code="context_length_exceeded")
    assert "256 tokens" in msg and "resulted in" in msg


def _send_big(served, head: bytes, body_parts) -> int:
    """Send a request whose body the server may refuse halfway (it answers and closes); its status."""
    u = urlsplit(served.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        try:
            sock.sendall(head)
            for part in body_parts:
                sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: what matters is the answer
        reply = b""
        try:
            while b"\r\n" not in reply and (data := sock.recv(65536)):
                reply += data
        except ConnectionResetError:
            pass
    assert reply.startswith(b"HTTP/1.1 "), reply[:100]
    return int(reply.split()[1])


def test_huge_bodies_are_refused(served):
    _error(_request(served, "POST", CHAT, b"x", {"Content-Length": str(MAX_BODY_BYTES + 1)}), 413)
    mib = b"x" * 2**20
    n = MAX_BODY_BYTES // 2**20 + 2
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {n * 2**20}\r\n\r\n".encode()
    assert _send_big(served, head, [mib] * n) == 413
    # Chunked, so there is no Content-Length to check up front: the cap applies while reading.
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    assert _send_big(served, head, [b"100000\r\n" + mib + b"\r\n"] * n + [b"0\r\n\r\n"]) == 413


def test_routes_methods_and_host(served):
    _error(_request(served, "GET", "/v1/nothing"), 404, code="not_found")
    _error(_request(served, "GET", CHAT), 405)
    status, body = _request(served, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["models"]["axiom-tiny"]["state"] == "ready"
    # A keyless server answers only names of this machine (a DNS-rebinding page would send its own).
    _error(_request(served, "GET", "/v1/models", headers={"Host": "rebound.example"}), 421)
    assert _request(served, "GET", "/v1/models", headers={"Host": "localhost"})[0] == 200


def test_cors_is_off_by_default(served):
    u = urlsplit(served.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/v1/models", headers={"Origin": "http://page.example"})
    r = conn.getresponse()
    r.read()
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    conn.close()


def test_cors_and_key_when_configured(served):
    key = "serve-test-key-0123456789"
    server = Uvicorn(create_app(served.pool, key=key, cors_origins=("http://page.example",)))
    url = f"http://127.0.0.1:{server.port}"
    try:
        msg = _error(_request(url, "GET", "/v1/models"), 401, code="invalid_api_key")
        assert "Authorization: Bearer" in msg
        _error(_request(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong-key-0123456789"}), 401)
        status, body = _request(url, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and body["data"]
        # With a key, other host names are fine (that is what the key is for); /health stays open.
        assert _request(url, "GET", "/health", headers={"Host": "mybox.lan"})[0] == 200
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.headers["access-control-allow-origin"] == "http://page.example"
        conn.close()
    finally:
        server.stop()


def test_a_slow_client_does_not_hold_the_server(served):
    u = urlsplit(served.url)
    slow = socket.create_connection((u.hostname, u.port))
    try:
        body = json.dumps({"model": "axiom-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        slow.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body[:10].encode())  # ... and the rest never comes
        t0 = time.monotonic()
        assert _chat(served)[0] == 200
        assert _request(served, "GET", "/health")[0] == 200
        assert time.monotonic() - t0 < 60
    finally:
        slow.close()


def _stream_then_hang_up(served, chunks: int, max_tokens: int) -> list[dict]:
    u = urlsplit(served.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = {"model": "axiom-tiny", "messages": [{"role": "user", "content": "Count slowly."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0}
    conn.request("POST", CHAT, json.dumps(body))
    r = conn.getresponse()
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    got = []
    while len(got) < chunks:
        line = r.fp.readline()
        if line.startswith(b"data: {"):
            got.append(json.loads(line[6:]))
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return got


def test_a_disconnect_stops_the_generation(served):
    before = served.pool.health()["axiom-tiny"]
    got = _stream_then_hang_up(served, chunks=3, max_tokens=200)
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    deadline = time.monotonic() + 30
    while served.pool.health()["axiom-tiny"]["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    # The recorded reply (the server records) was stopped early, far from its 200 tokens, and says so.
    chat = next(c for c in served.store.list_chats() if c.title == "Count slowly.")
    reply = served.store.load(chat.id).path()[-1]
    assert reply.status == "stopped" and reply.run["stop_reason"] == "cancelled"
    assert 2 <= len(reply.token_ids) < 100
    assert served.pool.health()["axiom-tiny"]["served"] >= before["served"]  # and the model keeps serving
    assert _chat(served)[0] == 200

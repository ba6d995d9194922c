"""The network rule of `web` and `serve`: loopback needs no key, anything else does; keys never from argv."""
from __future__ import annotations

import pytest

from chatapp.netsafe import (KEY_ENV, KeyRequired, is_loopback, key_for_bind, key_matches, local_host_header,
                             read_key)

GOOD = "a-key-long-enough-to-pass"


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
                                         ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
                                         ("192.168.1.5", False), ("10.0.0.1", False)])
def test_is_loopback(host, local):
    assert is_loopback(host) is local


@pytest.mark.parametrize("header, ok", [("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True),
                                        ("[::1]:8000", True), ("127.0.0.1", True),
                                        ("127.0.0.1.rebind.example:8000", False), ("localhost.example", False),
                                        ("rebind.example:8000", False), ("", False), (None, False),
                                        ("192.168.1.5:8000", False)])
def test_local_host_header_never_resolves_names(header, ok):
    assert local_host_header(header) is ok


def test_loopback_bind_needs_no_key_but_keeps_one_that_is_given(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert key_for_bind("127.0.0.1") is None
    monkeypatch.setenv(KEY_ENV, GOOD)
    assert key_for_bind("127.0.0.1") == GOOD


def test_other_binds_need_a_key_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(KeyRequired, match=f"{KEY_ENV}.*--api-key-file"):
        key_for_bind("0.0.0.0")
    monkeypatch.setenv(KEY_ENV, f"  {GOOD}\n")
    assert key_for_bind("0.0.0.0") == GOOD
    f = tmp_path / "key"
    f.write_text("from-the-file-0123456789\nsecond line ignored\n")
    assert key_for_bind("0.0.0.0", f) == "from-the-file-0123456789"  # the file wins over the environment


def test_bad_keys_are_refused_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(KeyRequired, match="at least 16"):
        read_key()
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    with pytest.raises(KeyRequired, match="empty"):
        read_key(empty)
    with pytest.raises(KeyRequired, match="cannot read"):
        read_key(tmp_path / "missing")


def test_key_matches():
    assert key_matches(GOOD, GOOD)
    assert not key_matches(GOOD, GOOD[:-1]) and not key_matches(GOOD, None) and not key_matches(GOOD, "")

"""The one network rule shared by `smollchat web` and `smollchat serve`: loopback by default, a key for anything else.

A server bound to a loopback address is reachable from this machine only, so it needs no key. Any
other bind (a LAN address, 0.0.0.0, ::) must have an API key, read from the environment variable
SMOLLCHAT_API_KEY or from a file (`--api-key-file`); never from the command line alone, where other
users see it in the process list and the shell keeps it in its history. Torch-free and import-light:
both commands check this before loading anything.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from pathlib import Path

#: Where the key is read from when no file is named.
KEY_ENV = "SMOLLCHAT_API_KEY"
#: Shorter keys are refused: a guessable key on an open port protects nothing.
MIN_KEY_CHARS = 16


class KeyRequired(ValueError):
    """The bind is not local and no usable key was given; the message says how to give one."""


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if not host:
        return False  # an empty host binds every interface
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def read_key(key_file: str | os.PathLike | None = None) -> str | None:
    """The key from `key_file` (first line, stripped), else from $SMOLLCHAT_API_KEY, else None."""
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise KeyRequired(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise KeyRequired(f"the API key file {path} is empty; write the key on its first line")
    else:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            return None
    if len(key) < MIN_KEY_CHARS:
        raise KeyRequired(f"the API key is {len(key)} characters; use at least {MIN_KEY_CHARS} "
                        "(e.g. `python -c \"import secrets; print(secrets.token_urlsafe(24))\"`)")
    return key


def key_for_bind(host: str, key_file: str | os.PathLike | None = None) -> str | None:
    """The key clients must present for a server bound to `host`: None for a loopback bind without
    a key; raises KeyRequired for a non-loopback bind without one. A key given for a loopback bind is
    still enforced."""
    key = read_key(key_file)
    if key is None and not is_loopback(host):
        raise KeyRequired(
            f"binding to {host!r} exposes smollchat beyond this machine, so it needs an API key: set "
            f"{KEY_ENV} or pass --api-key-file FILE (at least {MIN_KEY_CHARS} characters); or bind to "
            "127.0.0.1")
    return key


def local_host_header(value: str | None) -> bool:
    """True when an HTTP Host header names this machine literally (a loopback IP or `localhost`).

    A loopback server without a key checks this on every request: a web page the user visits could
    otherwise point its own domain at 127.0.0.1 (DNS rebinding) and read the answers. The name is
    never resolved, since resolving is exactly what the attacker controls."""
    if not value:
        return False
    host = value.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_matches(expected: str, offered: str | None) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    return offered is not None and hmac.compare_digest(expected.encode(), offered.encode())

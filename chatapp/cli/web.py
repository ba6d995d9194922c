"""`smollchat web`: the same Textual app served to a browser with textual-serve.

Every browser tab gets its own `python -m chatapp` process (textual-serve's model), all on the one chat
store, which takes concurrent writers (WAL + busy timeout). Loopback bind by default; any other bind
needs the API key of `chatapp.netsafe` (browsers present it once as `?key=...`, then as a cookie).

Nothing the page loads leaves the machine: textual-serve's page links its "Roboto Mono" font from a
web-font service, so the page is served with that link replaced by an @font-face on the copy of the
font textual-serve itself ships in its static folder (system monospace fonts are the fallback).
Requests whose Host header is not this machine's loopback name are refused when no key is set
(DNS rebinding), and the app's websocket only answers pages from its own origin.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import socket
import sys
import webbrowser
from pathlib import Path
from urllib.parse import urlsplit

from .common import EXIT_OK, EXIT_USAGE, CliError

ORDER = 60
#: Cookie that carries the key after the first `?key=` visit.
COOKIE = "smollchat_key"
_FONT_LINK = re.compile(r"<link\b[^>]*fonts\.googleapis\.com[^>]*/?>", re.S)
_LOCAL_FONT = """<style>
      @font-face { font-family: "Roboto Mono"; font-style: normal; font-weight: 100 700;
        src: url("{{ config.static.url }}fonts/RobotoMono-VariableFont_wght.ttf") format("truetype"); }
      @font-face { font-family: "Roboto Mono"; font-style: italic; font-weight: 100 700;
        src: url("{{ config.static.url }}fonts/RobotoMono-Italic-VariableFont_wght.ttf") format("truetype"); }
    </style>"""
#: URLs a served page may name that are not requests: SVG's XML namespace.
_NOT_FETCHED = ("http://www.w3.org/2000/svg",)


def register(sub) -> None:
    w = sub.add_parser("web", help="serve the app to a web browser (one app per tab)",
                       description="Serve the smollchat TUI to a browser with textual-serve. Loopback only "
                       "unless --host says otherwise; a non-loopback bind needs an API key from "
                       "$SMOLLCHAT_API_KEY or --api-key-file.")
    # SUPPRESS: `smollchat --model X web` keeps the top-level value instead of resetting it to None.
    w.add_argument("--model", default=argparse.SUPPRESS, help="catalog id or model directory to open each tab on")
    w.add_argument("--system", default=argparse.SUPPRESS, help="system prompt for each tab's new chat")
    w.add_argument("--fake", action="store_true", default=argparse.SUPPRESS,
                   help="each tab on the scripted fake engine (no model, no torch)")
    w.add_argument("--no-engine-process", dest="engine_process", action="store_false", default=argparse.SUPPRESS,
                   help="each tab runs its model in the tab's own process (default: in a child process)")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    w.add_argument("--public-url", help="the URL browsers use to reach this server (default http://HOST:PORT)")
    w.add_argument("--api-key-file", help="file whose first line is the API key (else $SMOLLCHAT_API_KEY)")
    w.add_argument("--open", action="store_true", help="open the page in the default browser")
    w.set_defaults(func=run)


def app_command(args) -> str:
    """The shell command textual-serve runs for each tab: this Python, this package, the chosen flags."""
    cmd = [sys.executable, "-m", "chatapp"]
    if getattr(args, "fake", False):
        cmd.append("--fake")
    elif getattr(args, "model", None):
        cmd += ["--model", args.model]
    if getattr(args, "system", None):
        cmd += ["--system", args.system]
    if not getattr(args, "engine_process", True):
        cmd.append("--no-engine-process")
    return shlex.join(cmd)


def page_template() -> str:
    """textual-serve's page with its web-font link swapped for the font it ships; refuses a page that
    would still fetch anything from another host (a textual-serve upgrade must be looked at)."""
    import textual_serve

    page = (Path(textual_serve.__file__).parent / "templates" / "app_index.html").read_text(encoding="utf-8")
    page = _FONT_LINK.sub(_LOCAL_FONT, page)
    remote = [u for u in re.findall(r"https?://[^\s\"'<>)]+", page) if not u.startswith(_NOT_FETCHED)]
    if remote:
        raise CliError(f"textual-serve's page template links {', '.join(remote)}; smollchat web serves only local "
                       "files, so this textual-serve version needs its template reviewed")
    return page


def public_url(host: str, port: int, given: str | None) -> str:
    if given:
        return given.rstrip("/")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # a wildcard address is not something a browser can open
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def make_server(command: str, *, host: str, port: int, url: str, key: str | None, open_browser: bool = False):
    """The textual-serve Server with smollchat's page, key check and start-up message."""
    import aiohttp_jinja2
    import jinja2
    from aiohttp import web
    from textual_serve.server import Server

    from ..netsafe import key_matches, local_host_header

    template = page_template()
    url_host = urlsplit(url).netloc

    def ours(netloc: str) -> bool:
        # The public URL's host, or this machine by any loopback name on our port (127.0.0.1 vs localhost).
        return netloc == url_host or (local_host_header(netloc) and urlsplit(f"//{netloc}").port == port)

    @web.middleware
    async def guard(request: web.Request, handler):
        if key is None and not ours(request.host):
            return web.Response(status=421, text="smollchat web answers only requests addressed to this machine "
                                "(open it as http://127.0.0.1:PORT)\n")
        origin = urlsplit(request.headers.get("Origin", "")).netloc
        if request.path == "/ws" and origin and not (origin == request.host or ours(origin)):
            return web.Response(status=403, text="smollchat web: websocket from another site refused\n")
        if key is not None:
            offered = request.query.get("key") or request.cookies.get(COOKIE)
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                offered = auth[7:].strip()
            if not key_matches(key, offered):
                return web.Response(status=401, text="smollchat web needs its API key: open the page as "
                                    f"{url}/?key=YOUR_KEY (the key in $SMOLLCHAT_API_KEY or the key file)\n")
        response = await handler(request)
        if key is not None and request.query.get("key") and not response.prepared:
            response.set_cookie(COOKIE, key, httponly=True, samesite="Strict")
        return response

    class WebServer(Server):
        async def _make_app(self) -> web.Application:
            app = await super()._make_app()
            aiohttp_jinja2.setup(app, loader=jinja2.DictLoader({"app_index.html": template}))
            app.middlewares.append(guard)
            return app

        async def on_startup(self, app: web.Application) -> None:
            where = f"{url}/" if key is None else f"{url}/?key=YOUR_KEY"
            self.console.print(f"smollchat web: open {where}  (one app per tab; Ctrl+C stops)", highlight=False)
            if open_browser:
                app["smollchat_opener"] = asyncio.ensure_future(_open_when_listening(host, port, f"{url}/"))

    return WebServer(command, host=host, port=port, title="smollchat", public_url=url)


async def _open_when_listening(host: str, port: int, url: str) -> None:
    """Open the browser once the port accepts connections (on_startup runs before the bind)."""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection(target, port)
            writer.close()
            break
        except OSError:
            await asyncio.sleep(0.1)
    await asyncio.get_running_loop().run_in_executor(None, webbrowser.open, url)


def run(args) -> int:
    from ..netsafe import KeyRequired, key_for_bind

    try:
        from textual_serve.server import Server  # noqa: F401  (a clear message when it is missing)
    except ImportError as e:
        raise CliError(f"smollchat web needs textual-serve ({e}); install smollchat again with its dependencies")
    if getattr(args, "fake", False) and getattr(args, "model", None):
        raise CliError("--fake and --model exclude each other: pick one", EXIT_USAGE)
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}", EXIT_USAGE)
    try:
        key = key_for_bind(args.host, args.api_key_file)
    except KeyRequired as e:
        raise CliError(str(e), EXIT_USAGE) from None
    url = public_url(args.host, args.port, args.public_url)
    server = make_server(app_command(args), host=args.host, port=args.port, url=url, key=key,
                         open_browser=args.open)
    try:
        server.serve()
    except OSError as e:
        raise CliError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    return EXIT_OK

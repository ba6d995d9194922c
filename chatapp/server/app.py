"""The HTTP routes of `smollchat serve` (Starlette) and the bridge from model workers to responses.

A request is checked (schema.py), its prompt rendered and measured off the event loop, then queued as
a job on its model's worker (pool.py). The worker streams the engine's events into an asyncio queue;
the response (JSON or SSE) reads from it. When a client goes away, its job's cancel flag and the engine
call's own flag are set: the engine stops before its next token, and a job still queued never starts.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.concurrency import run_in_threadpool

from ..chat.pool import Job, ModelPool, PoolError
from ..contract import Done, StepEvent
from ..netsafe import key_matches, local_host_header
from .generation import Prepared, prepare_chat, prepare_completion
from .record import Recorder
from .schema import MAX_BODY_BYTES, ApiError, parse_chat, parse_completion

_END = object()
#: How often a non-streaming request checks whether its client is still there.
POLL_S = 0.05


class _Bridge:
    """Events from a worker thread into the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.cancel.set()  # the loop is gone (server stopping): nobody listens any more


@dataclass
class Served:
    pool: ModelPool
    recorder: Recorder | None
    started: int  # the models' "created" time


def create_app(pool: ModelPool, *, key: str | None = None, cors_origins: tuple[str, ...] = (),
               recorder: Recorder | None = None) -> Starlette:
    """The ASGI app. `key`: required as `Authorization: Bearer` on /v1 (None: loopback callers only)."""
    served = Served(pool, recorder, int(time.time()))

    async def models(request: Request) -> Response:
        data = [{"id": mid, "object": "model", "created": served.started, "owned_by": "smollchat",
                 "smollchat": {"name": e.name, "demo": e.demo, "context": e.context,
                               "state": pool.slots[mid].state if mid in pool.slots else "not loaded"}}
                for mid, e in sorted(pool.entries.items())]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        usage = pool.usage()
        return JSONResponse({"status": "ok", "memory": {"budget": usage.budget, "used": usage.used},
                             "models": pool.health()})

    async def chat(request: Request) -> Response:
        req = parse_chat(await _json(request))
        slot = _slot(pool, req.model)
        prepared = await run_in_threadpool(prepare_chat, slot.engine, req, served.recorder)
        return await _respond(request, pool, slot, prepared, req.stream, req.include_usage)

    async def completions(request: Request) -> Response:
        req = parse_completion(await _json(request))
        slot = _slot(pool, req.model)
        prepared = await run_in_threadpool(prepare_completion, slot.engine, req)
        return await _respond(request, pool, slot, prepared, req.stream, req.include_usage)

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(ApiError(404, f"No route {request.method} {request.url.path}; this server has GET /v1/models, "
                                    "POST /v1/chat/completions, POST /v1/completions, GET /health", code="not_found"))

    async def bad_method(request: Request, exc: Exception) -> Response:
        return _error(ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    async def api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc)

    async def crashed(request: Request, exc: Exception) -> Response:
        return _error(ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    middleware = [Middleware(_Guard, key=key)]
    if cors_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: not_found, 405: bad_method, ApiError: api_error, Exception: crashed})


class _Guard:
    """Pure ASGI (a BaseHTTPMiddleware would buffer SSE and hide disconnects): the key on /v1, the Host
    header on a keyless (loopback) server against DNS rebinding, and the body-size cap."""

    def __init__(self, app: Callable, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = None
        if self.key is None and not local_host_header(headers.get("host")):
            error = ApiError(421, "This server answers only requests addressed to this machine (127.0.0.1 or "
                                  "localhost); start it with an API key to serve other names.", code="misdirected")
        elif self.key is not None and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            if not (auth.startswith("Bearer ") and key_matches(self.key, auth[7:].strip())):
                error = ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY' (the key the server "
                                      "read from SMOLLCHAT_API_KEY or its key file).", code="invalid_api_key")
        length = headers.get("content-length", "0")
        if error is None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            error = _too_big()
        if error is not None:
            return await _error(error)(scope, receive, send)
        await self.app(scope, receive, send)


def _too_big() -> ApiError:
    return ApiError(413, f"The request body is over {MAX_BODY_BYTES // 2**20} MiB.", code="request_too_large")


async def _json(request: Request) -> Any:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # a chunked body has no Content-Length to check up front
            raise _too_big()
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None


def _slot(pool: ModelPool, model: str):
    try:
        return pool.slot(model)
    except PoolError as e:
        headers = {"Retry-After": str(int(e.retry_after))} if e.retry_after else None
        raise ApiError(e.status, str(e), param="model", code=e.code, headers=headers) from None


def _error(e: ApiError) -> Response:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _respond(request: Request, pool: ModelPool, slot, prepared: Prepared, stream: bool,
                   include_usage: bool) -> Response:
    bridge = _Bridge(asyncio.get_running_loop())

    def run(engine: Any) -> None:
        try:
            events = prepared.start(engine, bridge.cancel)
            try:
                for ev in events:
                    bridge.put(ev)
                    if bridge.cancel.is_set():
                        break  # the client left: close the stream now (at most this one token was extra)
            finally:
                events.close()
            slot.counts["cancelled" if bridge.cancel.is_set() else "served"] += 1
        except Exception as e:
            bridge.put(e)
            raise
        finally:
            bridge.put(_END)

    pool.submit(slot, Job(run, bridge.cancel, skipped=lambda: bridge.put(_END)))
    if stream:
        return StreamingResponse(_sse(bridge, prepared, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.ensure_future(_watch(request, bridge, prepared))
    try:
        async for item in _events(bridge):
            prepared.add(item)
    finally:
        watcher.cancel()
    return JSONResponse(prepared.response())


async def _watch(request: Request, bridge: _Bridge, prepared: Prepared) -> None:
    while not bridge.cancel.is_set():
        if await request.is_disconnected():
            bridge.cancel.set()
            prepared.stop()
            return
        await asyncio.sleep(POLL_S)


async def _events(bridge: _Bridge) -> AsyncIterator[StepEvent | Done]:
    while (item := await bridge.queue.get()) is not _END:
        if isinstance(item, Exception):
            raise ApiError(500, f"The model failed: {type(item).__name__}: {item}", code="generation_failed")
        yield item


async def _sse(bridge: _Bridge, prepared: Prepared, include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _data(prepared.chunk_start())
        async for item in _events(bridge):
            for chunk in prepared.add(item):
                yield _data(chunk)
        if include_usage:
            yield _data(prepared.chunk_usage())
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield _data(e.body())  # headers are sent: the error travels as an event, as OpenAI's does
        yield "data: [DONE]\n\n"
    finally:
        # Runs on a disconnect too (the response task is cancelled): stop the engine before its next token.
        if not bridge.cancel.is_set() and prepared.done is None:
            bridge.cancel.set()
            prepared.stop()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

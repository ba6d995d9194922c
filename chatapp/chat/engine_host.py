"""The engine in its own process: `EngineHost` fits `contract.EngineProtocol` and forwards every call to
a child Python process that builds the engine and runs `generate` there.

Why a process: in one process the UI and the engine share the GIL, and a Textual paint of a long reply
holds it for milliseconds; fed at 2,000 tok/s, the FakeEngine inside the app reached 975 tok/s on a
2k-token reply and 783 on a 20k one (bench/tui.md). In a child the engine has an interpreter of its
own and the UI can only delay what it shows, never what the engine computes.

Why here (chat/, not tui/ or engine/): the TUI, `smollchat web` (one TUI process per tab) and
`smollchat serve` all reach an engine through the chat layer, and DESIGN.md asks for one mechanism for
the three. This side imports no torch: the child imports the engine (only there), as the in-process
loader does lazily. The tokenizer is built in the child and sent here once (prompts are rendered here).

The wire: one socketpair, pickled tuples (multiprocessing's framing).
- to the child: ("generate", call, ids, settings, controls, detail, channel) where channel is None or the
  ControlChannel's schedule and pending values; ("cancel", call | None); ("control", call, values);
  ("ask", request, what, arg) for memory and a control's own check; ("close",).
- to the parent: ("progress", stage), ("loaded", {...}) or ("failed", error) once; ("events", [(call,
  item), ...]) where item is a StepEvent, Done, _END or a _Failure; ("answer", request, ok, value).
The child sends events in batches (the first after a pause at once, then at most one send per BATCH_S),
so a fast engine pays one pickling per batch; a reader thread here drains the socket into per-call
queues at once, so a busy UI never throttles the child. Errors in the child come back as the same
exception types where those import without torch, else as a same-named RuntimeError subclass (the
message and type name read as they do in-process); a child that dies ends every open call with an
EngineProcessError that says how it ended.
"""
from __future__ import annotations

import builtins
import importlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..contract import ControlChannel, ControlSpec, Done, MemoryReport, SamplingSettings, StepEvent, TokenDetail

#: Seconds the child gathers events before its next send (after a send; the first goes out at once).
BATCH_S = 0.005
#: The child's send buffer on the socket (bytes). Small, so that while this side's reader is behind (its
#: thread waits for the GIL that a busy UI thread holds, up to the switch interval per read) the child's
#: sends block and its events gather into one larger batch, which this side reads in one go, instead of
#: queueing as many small batches in a large buffer (the default is ~200 KB, seconds of events at the
#: FakeEngine's 2,000 tok/s). bench/tui_stream.py showed no change beyond its noise (bench/tui.md).
SEND_BUFFER_BYTES = 16_384
#: How long a memory report stays fresh here (the panels and the generation worker ask often).
MEMORY_FRESH_S = 0.25
#: Seconds to wait for an answer from the child (a control check) before calling it hung.
ASK_TIMEOUT_S = 5.0
#: Seconds a memory report may take (the UI thread asks; a busy child answers within milliseconds).
MEMORY_TIMEOUT_S = 2.0
#: Modules whose exception classes are rebuilt as themselves here (they import no torch).
_TORCH_FREE = ("chatapp.contract", "chatapp.catalog", "chatapp.engine.tokenizer", "chatapp.chat.session")


class EngineProcessError(RuntimeError):
    """The engine's process could not start, died, hung or was closed; the message says which."""


class EngineProcessUnavailable(EngineProcessError):
    """No child process could be started here (the caller may run the engine in this process)."""


@dataclass(frozen=True)
class Build:
    """A picklable recipe for the engine in the child: `target(*args, **kwargs)`, a class or a module-level
    function; with `progress`, the load-stage callback goes in as `progress=`."""

    target: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    progress: bool = False


def load_catalog_engine(entry: Any, progress: Callable[[str], None] | None = None, **options: Any) -> Any:
    """(In the child.) `engine.runtime.load_engine` for a catalog entry or a local model directory."""
    from ..engine.runtime import entry_for_directory, load_engine

    if isinstance(entry, Path):
        entry = entry_for_directory(entry)
    return load_engine(entry, progress=progress, **options)


def load_engine_process(entry: Any, progress: Callable[[str], None] | None = None, **options: Any) -> "EngineHost":
    """Load a catalog entry (or a local directory) in a child process; `options` go to `load_engine`."""
    return EngineHost(Build(load_catalog_engine, (entry,), options, progress=True), progress)


@dataclass(frozen=True)
class _Failure:
    error: tuple  # _wire_error's fields


_END = "end"  # the call's generator returned


class _RemoteCheck:
    """A ControlSpec's own `check`, run in the child (it lives with the architecture, beside torch)."""

    def __init__(self, link: "_Link", name: str) -> None:
        self._link, self._name = link, name

    def __call__(self, value: Any) -> None:
        try:
            ok, message = self._link.ask("check", (self._name, value))
        except EngineProcessError as e:  # said as a refused value: the UI shows those where it asked
            raise ValueError(f"cannot be checked now: {e}") from None
        if not ok:
            raise ValueError(message) if isinstance(message, str) else _rebuild(message)


class EngineHost:
    """An engine running in a child process (see the module docstring); fits `EngineProtocol`.

    Args:
        build: how the child makes the engine.
        progress: receives the child's load stages.
    Raises the child's load error (same type name and message), or EngineProcessUnavailable when no
    child could be started.
    """

    def __init__(self, build: Build, progress: Callable[[str], None] | None = None) -> None:
        self._link = _Link(build)
        self._closer = weakref.finalize(self, self._link.close)
        try:
            loaded = self._link.wait_loaded(progress)
        except BaseException:
            self.close()
            raise
        self.entry = loaded["entry"]
        self.entry_id = self.entry.id
        self.tokenizer = loaded["tokenizer"]
        self.context_limit = loaded["context_limit"]
        self.controls: tuple[ControlSpec, ...] = tuple(
            replace(s, check=_RemoteCheck(self._link, s.name)) if s.name in loaded["checked"] else s
            for s in loaded["controls"])
        self._info = dict(loaded["info"], engine_process=self._link.proc.pid)
        self._memory: tuple[float, MemoryReport] = (time.monotonic(), loaded["memory"])
        self._asked: tuple[int, queue.SimpleQueue, float] | None = None  # a memory request sent while a reply streamed
        self._memory_lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._link.proc.pid

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def memory(self) -> MemoryReport:
        """The child's report (fresh for MEMORY_FRESH_S; a finished call makes it stale). Never raises: the
        panels ask from the UI thread, and a child that died or hangs is reported by `generate`; until
        then the last report stands. While a reply streams it never waits either: the answer would queue
        behind the reply's events, and the generation worker, which asks with every batch, would take no
        tokens meanwhile (up to MEMORY_TIMEOUT_S); it asks for a fresh report and returns the last one, and
        a later call takes the answer."""
        with self._memory_lock:
            if self._asked is not None:
                req, box, sent = self._asked
                try:
                    ok, report = box.get_nowait()
                except queue.Empty:
                    pass
                else:
                    self._link.answers.pop(req, None)
                    self._asked = None
                    if ok and sent > self._memory[0]:
                        self._memory = (sent, report)  # as of when it was asked
            at, last = self._memory
            if self._link.dead is not None or time.monotonic() - at < MEMORY_FRESH_S and self._link.ended <= at:
                return last
            if self._link.calls:
                if self._asked is None:
                    sent = time.monotonic()
                    try:
                        self._asked = (*self._link.ask_later("memory", None), sent)
                    except EngineProcessError:
                        pass
                return last
        try:
            ok, report = self._link.ask("memory", None, MEMORY_TIMEOUT_S)
        except EngineProcessError:
            return last
        if ok:
            self._memory = (time.monotonic(), report)
        return self._memory[1]

    def cancel(self) -> None:
        """Stop the call that is running now in the child."""
        self._link.send_quietly(("cancel", None))

    def close(self) -> None:
        """End the child (open calls end with EngineProcessError); idempotent."""
        self._closer()

    def generate(self, ids: list[int], settings: SamplingSettings | None = None,
                 controls: Mapping[str, Any] | None = None, *, cancel: threading.Event | None = None,
                 detail: TokenDetail = TokenDetail(), channel: ControlChannel | None = None
                 ) -> Iterator[StepEvent | Done]:
        """Stream a reply computed in the child; see EngineProtocol.generate."""
        link = self._link
        call = next(link.ids)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        cancel = cancel if cancel is not None else threading.Event()
        link.calls[call] = inbox
        finished, told = False, False
        try:
            relay = None
            if channel is not None:
                relay = channel.relay(lambda values: link.send_quietly(("control", call, dict(values))))
            link.send(("generate", call, list(ids), settings, None if controls is None else dict(controls), detail,
                       relay))
            while True:
                if not told and cancel.is_set():
                    link.send(("cancel", call))
                    told = True
                try:
                    batch = inbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                for item in batch:
                    if isinstance(item, str):  # _END
                        finished = True
                        return
                    if isinstance(item, _Failure):
                        finished = True
                        raise _rebuild(item.error)
                    yield item
        finally:
            link.calls.pop(call, None)
            if channel is not None:
                channel.relay(None)
            if not finished:
                # The consumer stopped listening (or failed) before the end: the child stops this call too.
                link.send_quietly(("cancel", call))


class _Link:
    """The parent's end: the child process, the socket, the reader thread and where answers go. Holds no
    reference to its EngineHost, so a host nobody uses is collected and its finalizer ends the child."""

    def __init__(self, build: Build) -> None:
        self.calls: dict[int, queue.SimpleQueue] = {}
        self.answers: dict[int, queue.SimpleQueue] = {}
        self.boot: queue.SimpleQueue = queue.SimpleQueue()
        self.ids = itertools.count(1)
        self.dead: str | None = None
        self.ended = 0.0  # monotonic time the last call ended
        self.closing = False
        self._lock = threading.Lock()
        self.log = tempfile.TemporaryFile()
        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            # A new session: the terminal's Ctrl+C or Ctrl+Z goes to the app, which decides about the child.
            # Imported by its name (not run as __main__), so what the child pickles names this module.
            code = f"from chatapp.chat.engine_host import _main; _main({theirs.fileno()})"
            self.proc = subprocess.Popen([sys.executable, "-c", code],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=self.log, env=env, start_new_session=True)
        except OSError as e:
            mine.close()
            raise EngineProcessUnavailable(f"the engine process could not be started: {e}") from None
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())
        try:
            self.conn.send(build)
        except Exception as e:
            self.close()
            raise EngineProcessUnavailable(f"the engine's recipe could not be sent to its process: {e}") from None
        self.reader = threading.Thread(target=self._read, name="engine-host-reader", daemon=True)
        self.reader.start()

    def send(self, msg: tuple) -> None:
        if self.dead is not None:
            raise EngineProcessError(self.dead)
        try:
            with self._lock:
                self.conn.send(msg)
        except (OSError, ValueError):
            raise EngineProcessError(self.dead or "the engine process is gone") from None

    def send_quietly(self, msg: tuple) -> None:
        """Send where a child that is gone needs no word here: the open call reports it."""
        try:
            self.send(msg)
        except EngineProcessError:
            pass

    def ask(self, what: str, arg: Any, timeout: float = ASK_TIMEOUT_S) -> tuple[bool, Any]:
        req, box = self.ask_later(what, arg)
        try:
            try:
                return box.get(timeout=timeout)
            except queue.Empty:
                raise EngineProcessError(f"the engine process did not answer ({what}) within {timeout:.0f} s"
                                         ) from None
        finally:
            self.answers.pop(req, None)

    def ask_later(self, what: str, arg: Any) -> tuple[int, queue.SimpleQueue]:
        """Send a request; its answer, (ok, value), arrives in the returned box (the caller pops
        answers[request] when done with it). Raises EngineProcessError when the child is gone."""
        req = next(self.ids)
        box: queue.SimpleQueue = queue.SimpleQueue()
        self.answers[req] = box
        try:
            self.send(("ask", req, what, arg))
        except BaseException:
            self.answers.pop(req, None)
            raise
        return req, box

    def wait_loaded(self, progress: Callable[[str], None] | None) -> dict[str, Any]:
        while True:
            kind, value = self.boot.get()
            if kind == "progress":
                if progress is not None:
                    progress(value)
            elif kind == "loaded":
                return value
            else:
                raise _rebuild(value)

    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "events":
                    mine: dict[int, list] = {}
                    for call, item in msg[1]:
                        mine.setdefault(call, []).append(item)
                        if isinstance(item, (str, _Failure)):
                            self.ended = time.monotonic()
                    for call, items in mine.items():
                        box = self.calls.get(call)
                        if box is not None:
                            box.put(items)
                elif kind == "answer":
                    box = self.answers.get(msg[1])
                    if box is not None:
                        box.put((msg[2], msg[3]))
                else:
                    self.boot.put((kind, msg[1]))
        except (EOFError, OSError):
            pass
        except Exception as e:  # a message that does not unpickle here: nothing after it can be trusted
            self.proc.kill()
            self.dead = f"the engine process sent a message this side cannot read ({type(e).__name__}: {e})"
        self._died()

    def _died(self) -> None:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if self.dead is None:
            self.dead = ("the engine process was closed (the model was unloaded)" if self.closing
                         else f"the engine process {_how(code)}{self._last_words()}; load the model again")
        failure = [_Failure(("chatapp.chat.engine_host", "EngineProcessError", self.dead, "RuntimeError", ""))]
        for box in list(self.calls.values()):
            box.put(failure)
        for box in list(self.answers.values()):
            box.put((False, failure[0].error))
        self.boot.put(("failed", failure[0].error))

    def _last_words(self) -> str:
        """The last line the child wrote to stderr (a Python error names itself there)."""
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - 4096))
            lines = [ln for ln in self.log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except (OSError, ValueError):
            return ""
        return f" ({lines[-1].strip()[:300]})" if lines else ""

    def close(self) -> None:
        self.closing = True
        if self.proc.poll() is None:
            try:
                with self._lock:
                    self.conn.send(("close",))
            except (OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.conn.close()
        reader = getattr(self, "reader", None)  # none yet when the recipe could not be sent
        if reader is not None and threading.current_thread() is not reader:
            reader.join(timeout=5)
        self.log.close()


def _how(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed (signal {-code})"
    return f"exited with code {code}"


def _wire_error(e: BaseException) -> tuple:
    """(module, name, message, nearest built-in base, traceback text) of an exception in the child."""
    cls = type(e)
    base = next((c.__name__ for c in cls.__mro__ if c.__module__ == "builtins" and issubclass(c, Exception)),
                "RuntimeError")
    return (cls.__module__, cls.__qualname__, str(e), base, "".join(traceback.format_exception(e))[-4000:])


_REMOTE_CLASSES: dict[tuple[str, str, str], type] = {}


def _rebuild(error: tuple) -> BaseException:
    """The child's exception as an exception of this side (see the module docstring)."""
    module, name, message, base, tb = error
    cls = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module in _TORCH_FREE or module == __name__:
        cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        key = (module, name, base)
        if key not in _REMOTE_CLASSES:
            parent = getattr(builtins, base, RuntimeError)
            _REMOTE_CLASSES[key] = type(name.rsplit(".", 1)[-1], (parent,), {"__module__": module})
        cls = _REMOTE_CLASSES[key]
    try:
        err = cls(message)
    except Exception:
        err = RuntimeError(f"{name}: {message}")
    err.remote_traceback = tb
    return err


# The child.
class _Outbox:
    """The child's outgoing events (see BATCH_S); `put` never waits for the socket."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        self._items: deque = deque()
        self._wake = threading.Event()
        self._send = send
        threading.Thread(target=self._run, name="engine-host-outbox", daemon=True).start()

    def put(self, call: int, item: Any) -> None:
        self._items.append((call, item))
        self._wake.set()

    def flush(self) -> None:
        batch = []
        while self._items:
            batch.append(self._items.popleft())
        if batch:
            self._send(("events", batch))

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.flush()
            time.sleep(BATCH_S)


def _child(conn: Connection) -> None:
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        try:
            with lock:
                conn.send(msg)
        except (OSError, ValueError):
            os._exit(0)  # the parent is gone

    try:
        build: Build = conn.recv()
        kw = dict(build.kwargs, progress=lambda stage: send(("progress", stage))) if build.progress else build.kwargs
        engine = build.target(*build.args, **kw)
    except BaseException as e:
        send(("failed", _wire_error(e)))
        return
    specs = tuple(engine.controls)
    send(("loaded", {"entry": engine.entry, "tokenizer": engine.tokenizer, "context_limit": engine.context_limit,
                     "info": _plain(engine.info()), "memory": engine.memory(), "controls": tuple(replace(s, check=None) for s in specs),
                     "checked": [s.name for s in specs if s.check is not None]}))
    outbox = _Outbox(send)
    running: dict[int, tuple[threading.Event, ControlChannel | None, threading.Thread]] = {}

    def run(call: int, args: tuple, cancel: threading.Event, channel: ControlChannel | None) -> None:
        ids, settings, controls, detail = args
        try:
            live = {"channel": channel} if channel is not None else {}
            for event in engine.generate(ids, settings, controls, cancel=cancel, detail=detail, **live):
                outbox.put(call, event)
            outbox.put(call, _END)
        except BaseException as e:
            outbox.put(call, _Failure(_wire_error(e)))
        finally:
            running.pop(call, None)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        kind = msg[0]
        if kind == "generate":
            call, relay = msg[1], msg[6]
            cancel = threading.Event()
            channel = None
            if relay is not None:
                channel = ControlChannel(relay[0])
                if relay[1]:
                    channel.set(relay[1])
            thread = threading.Thread(target=run, args=(call, msg[2:6], cancel, channel), daemon=True)
            running[call] = (cancel, channel, thread)
            thread.start()
        elif kind == "cancel":
            if msg[1] is None:
                engine.cancel()
            elif msg[1] in running:
                running[msg[1]][0].set()
        elif kind == "control":
            held = running.get(msg[1])
            if held is not None and held[1] is not None:
                held[1].set(msg[2])
        elif kind == "ask":
            send(("answer", msg[1], *_answer(engine, specs, msg[2], msg[3])))
        elif kind == "close":
            break
    for cancel, _channel, _thread in list(running.values()):
        cancel.set()
    for _cancel, _channel, thread in list(running.values()):
        thread.join(timeout=2)
    outbox.flush()


def _plain(value: Any) -> Any:
    """Built-in types only: an engine's figures may hold str subclasses of torch's (torch.__version__),
    which would import torch where they are unpickled."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else [_plain(v) for v in value]
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value if value is None else str(value)


def _answer(engine: Any, specs: tuple[ControlSpec, ...], what: str, arg: Any) -> tuple[bool, Any]:
    try:
        if what == "memory":
            return True, engine.memory()
        if what == "check":
            name, value = arg
            spec = next(s for s in specs if s.name == name)
            spec.check(value)
            return True, None
        raise ValueError(f"unknown question {what!r}")
    except ValueError as e:
        return False, str(e) if what == "check" else _wire_error(e)
    except Exception as e:
        return False, _wire_error(e)


def _main(fd: int) -> None:
    """The child's entry point: serve the engine on the socket `fd` until told to close or the parent goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends this process (or its socket closing does)
    code = 0
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:  # the same socket: set its send buffer
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        _child(Connection(fd))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: nothing is left to save here

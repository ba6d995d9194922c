"""The one model pool of the app, the TUI and `smollchat serve` alike: loaded engines within a memory budget.

A model is loaded once and kept while the budget allows; before a load its bytes are estimated
(`estimate(entry)`: the engine's figure is weights in the load dtype or quantization plus its
preallocated state plus the prompt cache's budget) and the least recently used idle engines are
unloaded until it fits. Once loaded, an engine is charged the larger of that estimate and what it
reports (`memory()`: weights + state + prompt cache). A model that cannot fit even alone is refused
with its size, the budget and what to do. `max_loaded` optionally caps the count as well.

Keys name what is loaded: a catalog id, or a variant of one (`variant(id, quantize=..., dtype=...)`,
e.g. "axiom-tiny·int8") whose entry carries those load options, so one model in two forms can sit side
by side (the compare screen's int8 vs bf16).

Two ways in: `acquire`/`release` load on the caller's thread and pin the engine while it is used (the
TUI's chat and compare screens); `slot`/`submit` answer "loading" (PoolError 503) while a background
load runs and then queue jobs first come first served on the model's own worker thread (the server:
an engine holds one state and runs one call at a time; its lock is not fair, this queue is). A job
whose client left before it started is skipped. No torch here: the loader and estimator are callables.
"""
from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

from ..catalog import ModelEntry
from ..units import human_bytes

#: The share of the memory available at start that the default budget takes: the rest is left to the
#: app itself, the other programs and the transient copies a load makes.
DEFAULT_SHARE = 0.6
#: Where the available memory cannot be read.
FALLBACK_BUDGET = 4 * 2**30
#: What the engine's prompt cache may hold per engine (engine/prompt_cache.DEFAULT_BUDGET; repeated here
#: so this module stays torch-free, and checked equal by a test).
PROMPT_CACHE_BYTES = 256 * 2**20
#: Bytes per parameter by load form, for the torch-free rough estimate (int8: a byte plus per-row scales;
#: int4: half a byte plus per-group scale and zero point).
BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "int4": 0.56}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PoolError(Exception):
    """A model cannot be had now. `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class Footprint(NamedTuple):
    """Estimated bytes of a loaded engine."""

    weights: int
    state: int  # the preallocated state plus the prompt cache's budget

    @property
    def total(self) -> int:
        return self.weights + self.state


def parse_bytes(text: str) -> int:
    """"8GiB", "512 MiB", "2.5G" (decimal), "1073741824" -> bytes; ValueError saying the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r}: write a number with an optional unit, e.g. 8GiB, 512MiB or 6GB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"memory size {text!r} must be more than zero")
    return value


def available_memory() -> int | None:
    """MemAvailable (free plus reclaimable cache) from /proc/meminfo, else the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def default_budget(available: int | None = None) -> int:
    """DEFAULT_SHARE of the memory available when the app starts (FALLBACK_BUDGET where unknown)."""
    avail = available_memory() if available is None else available
    return int(avail * DEFAULT_SHARE) if avail else FALLBACK_BUDGET


def rough_footprint(entry: ModelEntry) -> Footprint:
    """A torch-free estimate from the catalog alone: parameters x bytes per parameter of the load form
    (the download size where the parameter count is unknown), plus the prompt cache's budget. The engine's
    own estimate (engine.runtime.footprint) also counts the state exactly; the app uses that one."""
    form = entry.quantize if entry.quantize != "none" else entry.cpu_dtype
    if entry.params:
        weights = int(entry.params * BYTES_PER_PARAM.get(form, 4.0))
    else:
        weights = entry.source.size_bytes if entry.source else 0
    return Footprint(weights, PROMPT_CACHE_BYTES)


def variant_key(model_id: str, quantize: str | None = None, dtype: str | None = None) -> str:
    """The pool key of a model loaded with these options ("axiom·int8·bfloat16"; the bare id for none)."""
    return "·".join([model_id, *(o for o in (quantize, dtype) if o)])


@dataclass
class Job:
    """Work for one model's worker: `run(engine)` on its thread unless `cancel` is set first."""

    run: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    skipped: Callable[[], None] = lambda: None


class Slot:
    """One loaded (or loading) engine: its cost, pins, job queue and worker thread, counters for /health."""

    def __init__(self, key: str, entry: ModelEntry, cost: int) -> None:
        self.key, self.entry, self.cost = key, entry, cost
        self.engine: Any = None
        self.error: str | None = None
        self.loading = False
        self.pins = 0
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running = False
        self.last_used = time.monotonic()
        self.counts = {"served": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        return "ready" if self.engine is not None else "loading" if self.loading else \
            "failed" if self.error else "not loaded"

    @property
    def held(self) -> bool:
        """Counts against the budget (loaded or being loaded)."""
        return self.engine is not None or self.loading

    @property
    def idle(self) -> bool:
        return self.engine is not None and not self.pins and not self.running and self.jobs.empty()

    def start(self, engine: Any) -> None:
        self.engine, self.loading, self.error = engine, False, None
        self.cost = max(self.cost, measured_bytes(engine))
        self.last_used = time.monotonic()

    def worker(self) -> None:
        """Start the job worker (the server's path) once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"pool-{self.key}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Unload: the worker ends after the jobs already queued (the pool only stops idle slots)."""
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()  # an engine process (chat/engine_host.py) ends now
        self.engine = None

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set():
                self.counts["skipped"] += 1
                job.skipped()
                continue
            self.running = True
            try:
                job.run(self.engine)
            except Exception:  # the job reports its own errors to its client; the worker keeps serving
                self.counts["failed"] += 1
            finally:
                self.running = False
                self.last_used = time.monotonic()


def measured_bytes(engine: Any) -> int:
    """What a loaded engine reports holding: weights + allocated state + prompt cache snapshots."""
    try:
        m = engine.memory()
    except Exception:
        return 0
    return int(m.weights + m.state_total + m.prompt_cache)


@dataclass(frozen=True)
class Usage:
    """The budget and what holds it, for the UI and /health."""

    budget: int
    used: int
    loaded: tuple[tuple[str, str, int, str], ...]  # (key, model name, bytes, state)

    def line(self) -> str:
        return f"{human_bytes(self.used)} of {human_bytes(self.budget)} in {len(self.loaded)} engine(s)"


class ModelPool:
    """Keys -> slots within `budget` bytes (default_budget() when None) and at most `max_loaded` engines.

    `loader(entry, progress)` makes an engine; `estimate(entry)` -> Footprint before a load
    (rough_footprint when None).
    """

    def __init__(self, entries: dict[str, ModelEntry], loader: Callable[[ModelEntry, Callable[[str], None]], Any], *,
                 budget: int | None = None, estimate: Callable[[ModelEntry], Footprint] | None = None,
                 max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.entries = dict(entries)
        self.loader = loader
        self.estimate = estimate or rough_footprint
        self.budget = default_budget() if budget is None else int(budget)
        if self.budget <= 0:
            raise ValueError("the memory budget must be more than zero")
        self.max_loaded = max_loaded
        self.slots: dict[str, Slot] = {}
        self._lock = threading.RLock()
        self._loads: dict[str, threading.Event] = {}  # keys being loaded by acquire(), for waiters

    # Keys.
    def variant(self, model_id: str, quantize: str | None = None, dtype: str | None = None) -> str:
        """Register (once) the model `model_id` loaded with these options; returns its key."""
        base = self._entry(model_id)
        key = variant_key(model_id, quantize, dtype)
        with self._lock:
            if key not in self.entries:
                self.entries[key] = replace(base, **({"quantize": quantize} if quantize else {}),
                                            **({"cpu_dtype": dtype} if dtype else {}))
        return key

    def _entry(self, key: str) -> ModelEntry:
        entry = self.entries.get(key)
        if entry is None:
            raise PoolError(f"The model '{key}' does not exist; GET /v1/models lists the models served here.",
                            404, "model_not_found")
        return entry

    def cost(self, key: str) -> int:
        """Bytes `key` holds when loaded, else its estimate."""
        with self._lock:
            slot = self.slots.get(key)
            if slot is not None and slot.held:
                return slot.cost
        return self.estimate(self._entry(key)).total

    def fits_together(self, keys: list[str]) -> bool:
        """Whether these engines can all be held at once, beside the ones in use now (which cannot unload),
        within the budget and max_loaded."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            busy = [s for k, s in self.slots.items() if k not in keys and s.held and not s.idle]
        if self.max_loaded is not None and len(keys) + len(busy) > self.max_loaded:
            return False
        return sum(self.cost(k) for k in keys) + sum(s.cost for s in busy) <= self.budget

    # The TUI's way in: load on this thread, pinned while used.
    def acquire(self, key: str, progress: Callable[[str], None] | None = None) -> Any:
        """The engine for `key`, loaded here if it is not (other idle engines unload to make room); pinned
        until `release(key)`. Raises PoolError when it cannot fit, and what the loader raises."""
        say = progress or (lambda _s: None)
        while True:
            with self._lock:
                slot = self.slots.get(key)
                if slot is not None and slot.engine is not None:
                    slot.pins += 1
                    slot.last_used = time.monotonic()
                    return slot.engine
                waiting = self._loads.get(key)
                if waiting is None:
                    entry = self._entry(key)
                    need = self.estimate(entry)
                    self._make_room(key, need, entry)
                    slot = self.slots[key] = Slot(key, entry, need.total)
                    slot.loading = True
                    done = self._loads[key] = threading.Event()
                    break
            waiting.wait()  # another thread loads it: take that engine when ready
        try:
            engine = self.loader(entry, say)
        except BaseException:
            with self._lock:
                self.slots.pop(key, None)
                self._loads.pop(key, None)
            done.set()
            raise
        with self._lock:
            slot.start(engine)
            slot.pins += 1
            self._loads.pop(key, None)
        done.set()
        return engine

    def release(self, key: str) -> None:
        """The caller no longer uses `key`'s engine: it stays loaded, evictable when room is needed."""
        with self._lock:
            slot = self.slots.get(key)
            if slot is not None and slot.pins:
                slot.pins -= 1
                slot.last_used = time.monotonic()

    def add_entry(self, entry: ModelEntry) -> str:
        """Make a model the catalog does not list (a local directory) loadable; returns its key."""
        with self._lock:
            self.entries.setdefault(entry.id, entry)
        return entry.id

    def add_engine(self, engine: Any, key: str | None = None, pin: bool = False) -> str:
        """Hold an engine loaded elsewhere (under its entry's id unless `key` says otherwise), charged what it
        reports; idle engines unload to make room for it where they can (it is here already either way)."""
        key = key or engine.entry.id
        with self._lock:
            self.entries.setdefault(key, engine.entry)
            slot = self.slots.get(key)
            if slot is None or slot.engine is not engine:
                try:
                    self._make_room(key, Footprint(measured_bytes(engine), 0), engine.entry)
                except PoolError:
                    pass  # over the budget while the others are in use: usage() shows it
                slot = self.slots[key] = Slot(key, engine.entry, 0)
                slot.start(engine)
            slot.pins += pin
        return key

    def holds(self, engine: Any) -> bool:
        """Whether `engine` is still loaded here (not unloaded to make room)."""
        with self._lock:
            return any(s.engine is engine for s in self.slots.values())

    # The server's way in: background loads and a queue per model.
    def preload(self, key: str) -> None:
        """Load now, on this thread (`smollchat serve --model`); raises what the loader raises."""
        self.acquire(key)
        self.release(key)
        self.slots[key].worker()

    def slot(self, key: str) -> Slot:
        """The ready slot for `key`; starts loading it (PoolError 503) when it is not loaded."""
        entry = self._entry(key)
        with self._lock:
            slot = self.slots.get(key)
            if slot is not None and slot.engine is not None:
                slot.last_used = time.monotonic()
                slot.worker()
                return slot
            if slot is not None and slot.error is not None:
                del self.slots[key]  # reported once; the next request tries to load it again
                raise PoolError(f"The model '{key}' failed to load: {slot.error}", 500, "model_load_failed")
            if slot is None:
                need = self.estimate(entry)
                self._make_room(key, need, entry)
                slot = self.slots[key] = Slot(key, entry, need.total)
                slot.loading = True
                threading.Thread(target=self._load, args=(slot,), daemon=True).start()
        raise PoolError(f"The model '{key}' is loading; retry in a few seconds.", 503, "model_loading", retry_after=2)

    def _load(self, slot: Slot) -> None:
        try:
            engine = self.loader(slot.entry, lambda _s: None)
        except Exception as e:
            slot.error, slot.loading = f"{type(e).__name__}: {e}", False
            return
        with self._lock:
            slot.start(engine)
            slot.worker()

    def submit(self, slot: Slot, job: Job) -> None:
        slot.jobs.put(job)

    # Room.
    def _make_room(self, key: str, need: Footprint, entry: ModelEntry) -> None:
        """Unload least recently used idle engines until `need` fits beside the others (lock held)."""
        if need.total > self.budget:
            raise PoolError(too_big(entry, need, self.budget), 507, "model_too_large")
        held = [s for k, s in self.slots.items() if k != key and s.held]
        while (sum(s.cost for s in held) + need.total > self.budget
               or (self.max_loaded is not None and len(held) >= self.max_loaded)):
            idle = [s for s in held if s.idle]
            if not idle:
                busy = ", ".join(f"{s.key} ({human_bytes(s.cost)})" for s in held)
                raise PoolError(f"{entry.name} needs about {human_bytes(need.total)}, but the "
                                f"{human_bytes(self.budget)} memory "
                                f"budget is held by models in use: {busy}. Retry when one finishes, or raise the "
                                "budget (--memory-budget).", 503, "pool_busy", retry_after=5)
            victim = min(idle, key=lambda s: s.last_used)
            victim.stop()
            del self.slots[victim.key]
            held.remove(victim)

    def usage(self) -> Usage:
        with self._lock:
            held = [(k, s.entry.name, s.cost, s.state) for k, s in self.slots.items() if s.held]
        return Usage(self.budget, sum(c for _, _, c, _ in held), tuple(held))

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {k: {"state": s.state, "bytes": s.cost, "queued": s.jobs.qsize(), "running": s.running, **s.counts,
                        **({"error": s.error} if s.error else {})} for k, s in self.slots.items()}

    def close(self) -> None:
        with self._lock:
            for s in self.slots.values():
                s.stop()
            self.slots.clear()


def too_big(entry: ModelEntry, need: Footprint, budget: int) -> str:
    """The refusal of a model that cannot fit even alone: its size, the budget, what to do."""
    advice = f"start with --memory-budget {max(1, -(-need.total // 2**30))}GiB or more"
    if entry.quantize == "none" and entry.params:
        advice += ", load it quantized (int8 or int4)"
    return (f"{entry.name} needs about {human_bytes(need.total)} ({human_bytes(need.weights)} of weights + "
            f"{human_bytes(need.state)} of state and prompt cache) but the memory budget is {human_bytes(budget)}: "
            f"{advice}, or choose a smaller model.")

"""The served models: which ids exist, which are loaded, and one first-come-first-served queue per model.

An engine holds one state and runs one call at a time, so every request to a model becomes a job on
that model's own worker thread, taken strictly in arrival order (the engine's lock is not fair; this
queue is). A job whose client left before it started is skipped. Models load lazily in the background
(requests meanwhile get "loading", which the HTTP layer answers with 503), at most `max_loaded` at
once; the least recently used idle model is unloaded to make room.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..catalog import ModelEntry


class PoolError(Exception):
    """A model cannot serve now. `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


@dataclass
class Job:
    """Work for one model's worker: `run(engine)` on its thread unless `cancel` is set first."""

    run: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    skipped: Callable[[], None] = lambda: None


class Slot:
    """One model: its engine once loaded, its job queue and worker thread, and counters for /health."""

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.engine: Any = None
        self.error: str | None = None
        self.loading = False
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running = False
        self.last_used = time.monotonic()
        self.counts = {"served": 0, "cancelled": 0, "skipped": 0, "failed": 0}
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> str:
        return "ready" if self.engine is not None else "loading" if self.loading else \
            "failed" if self.error else "not loaded"

    def start(self, engine: Any) -> None:
        self.engine, self.loading, self.error = engine, False, None
        self._thread = threading.Thread(target=self._work, name=f"serve-{self.entry.id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Unload: the worker ends after the jobs already queued (the pool only stops idle slots)."""
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()  # an engine process ends now
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

    @property
    def idle(self) -> bool:
        return not self.running and self.jobs.empty()


class ModelPool:
    """Model ids -> slots. `loader(entry)` makes an engine (runs on a background thread)."""

    def __init__(self, entries: dict[str, ModelEntry], loader: Callable[[ModelEntry], Any], max_loaded: int = 2
                 ) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.entries = entries
        self.loader = loader
        self.max_loaded = max_loaded
        self.slots: dict[str, Slot] = {}
        self._lock = threading.Lock()

    def add_engine(self, engine: Any) -> None:
        """Serve an engine that is already loaded (under its entry's id)."""
        with self._lock:
            self.entries.setdefault(engine.entry.id, engine.entry)
            slot = self.slots.setdefault(engine.entry.id, Slot(engine.entry))
            slot.start(engine)

    def preload(self, model_id: str) -> None:
        """Load now, on this thread (`smollchat serve --model`); raises what the loader raises."""
        entry = self._entry(model_id)
        with self._lock:
            self._make_room(model_id)
        self.add_engine(self.loader(entry))

    def _entry(self, model_id: str) -> ModelEntry:
        entry = self.entries.get(model_id)
        if entry is None:
            raise PoolError(f"The model '{model_id}' does not exist; GET /v1/models lists the models served here.",
                            404, "model_not_found")
        return entry

    def slot(self, model_id: str) -> Slot:
        """The ready slot for model_id; starts loading it (PoolError 503) when it is not loaded."""
        entry = self._entry(model_id)
        with self._lock:
            slot = self.slots.get(model_id)
            if slot is not None and slot.engine is not None:
                slot.last_used = time.monotonic()
                return slot
            if slot is not None and slot.error is not None:
                del self.slots[model_id]  # reported once; the next request tries to load it again
                raise PoolError(f"The model '{model_id}' failed to load: {slot.error}", 500, "model_load_failed")
            if slot is None:
                self._make_room(model_id)
                slot = self.slots[model_id] = Slot(entry)
                slot.loading = True
                threading.Thread(target=self._load, args=(slot,), daemon=True).start()
        raise PoolError(f"The model '{model_id}' is loading; retry in a few seconds.", 503, "model_loading",
                        retry_after=2)

    def _load(self, slot: Slot) -> None:
        try:
            engine = self.loader(slot.entry)
        except Exception as e:
            slot.error, slot.loading = f"{type(e).__name__}: {e}", False
            return
        slot.start(engine)

    def _make_room(self, model_id: str) -> None:
        """Unload the least recently used idle model when `max_loaded` are loaded or loading (lock held)."""
        held = [s for k, s in self.slots.items() if k != model_id and (s.engine is not None or s.loading)]
        while len(held) >= self.max_loaded:
            idle = [s for s in held if s.engine is not None and s.idle]
            if not idle:
                raise PoolError(f"All {self.max_loaded} model slots are busy; retry later, or start the server "
                                "with a larger --max-models.", 503, "pool_busy", retry_after=5)
            victim = min(idle, key=lambda s: s.last_used)
            victim.stop()
            del self.slots[victim.entry.id]
            held.remove(victim)

    def submit(self, slot: Slot, job: Job) -> None:
        slot.jobs.put(job)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {k: {"state": s.state, "queued": s.jobs.qsize(), "running": s.running, **s.counts,
                        **({"error": s.error} if s.error else {})} for k, s in self.slots.items()}

    def close(self) -> None:
        with self._lock:
            for s in self.slots.values():
                s.stop()
            self.slots.clear()

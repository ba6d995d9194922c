"""The engine handle the chat layer holds: a loaded model, its tokenizer and one preallocated state.

`load_engine(entry)` resolves the entry's files (a downloaded snapshot, or the demo checkpoint made
on first use), loads the model strictly and allocates the state for the whole context once.
`Engine.generate` reuses whatever the state already holds: a KV cache is trimmed back to the common
prefix with the new prompt; a recurrent state (which cannot drop tokens) continues when the new
prompt extends what it absorbed, or restores the snapshot taken at the end of the last prompt
(regenerate), else starts over.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..catalog import CatalogError, ModelEntry, load_catalog
from ..contract import (ControlSpec, Controls, Done, MemoryReport, SamplingSettings, StepEvent, TokenDetail,
                        resolve_controls)
from .arch.base import Forward, Interrupted
from .generate import DecodeRequest, decode_loop, feed
from .loader import LoadError, load_model, read_config, resolve_device, resolve_dtype
from .tokenizer import Tokenizer, load_tokenizer


class Engine:
    """A loaded model ready to generate. Fits `api.EngineProtocol`."""

    def __init__(self, model, tokenizer: Tokenizer, entry: ModelEntry, device: torch.device, dtype: torch.dtype,
                 context_limit: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.entry = entry
        self.entry_id = entry.id
        self.device = device
        self.dtype = dtype
        self.context_limit = context_limit
        self.controls: tuple[ControlSpec, ...] = tuple(model.control_specs())
        unknown = set(entry.controls) - {c.name for c in self.controls}
        if unknown:
            raise LoadError(f"{entry.id}: the catalog sets control(s) {', '.join(sorted(unknown))}, which this "
                            f"model does not have ({', '.join(c.name for c in self.controls) or 'none'})")
        resolve_controls(self.controls, entry.controls)  # a catalog value this model refuses fails the load
        self.state = model.make_state(context_limit, device, dtype)
        self._fed: list[int] = []  # ids absorbed by self.state, in order
        self._prompt_snap: tuple[tuple[int, ...], object, torch.Tensor] | None = None
        self._running: threading.Event | None = None  # the cancel flag of the call holding the lock
        self._state_key: tuple = ()  # the state-changing controls the state was built under
        self._lock = threading.Lock()

    # Contract.
    def cancel(self) -> None:
        """Stop the call that is running now (a queued call keeps going; its caller cancels it by its own flag)."""
        running = self._running
        if running is not None:
            running.set()

    def default_settings(self) -> SamplingSettings:
        return self.entry.sampling()

    def resolve(self, controls: Mapping[str, Any] | None = None) -> Controls:
        """This model's complete controls: architecture < catalog entry < `controls` (see contract)."""
        return resolve_controls(self.controls, self.entry.controls, call=controls)

    def generate(self, ids: list[int], settings: SamplingSettings | None = None,
                 controls: Mapping[str, Any] | None = None, *, cancel: threading.Event | None = None,
                 detail: TokenDetail = TokenDetail()) -> Iterator[StepEvent | Done]:
        """Stream a reply to the prompt `ids`; see contract.StepEvent / contract.Done.

        `controls` are complete `Controls` (a chat session's) or a partial dict merged over the catalog's
        here; `cancel` is this call's own flag (set it to stop this call, even before it starts).
        """
        settings = settings or self.default_settings()
        settings.validate()
        controls = controls if isinstance(controls, Controls) else self.resolve(controls)
        stop_ids = frozenset(settings.stop_ids) | frozenset(self.tokenizer.stop_ids)
        cancel = cancel if cancel is not None else threading.Event()
        with self._lock:
            self._running = cancel
            try:
                # Inference mode is entered around each step of the stream, not across its yields: it is
                # thread-local, and the consumer's code between two events must not run under it.
                events = self._stream(ids, settings, stop_ids, controls, cancel, detail)
                while True:
                    with torch.inference_mode():
                        event = next(events, None)
                    if event is None:
                        return
                    yield event
            finally:
                self._running = None

    def _stream(self, ids: list[int], settings: SamplingSettings, stop_ids: frozenset[int], controls: Controls,
                cancel: threading.Event, detail: TokenDetail) -> Iterator[StepEvent | Done]:
        start = time.perf_counter()
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context_limit:
            yield Done("context_full", len(ids), 0, 0.0, 0.0, 0.0,
                       detail=f"the prompt has {len(ids)} tokens; the context holds {self.context_limit}")
            return
        try:
            first, reused = self._prefill(list(ids), controls, cancel)
        except Interrupted:
            yield Done("cancelled", len(ids), 0, 0.0, 0.0, 0.0,
                       detail=f"stopped during the prompt ({self.state.length} of {len(ids)} tokens absorbed)")
            return
        req = DecodeRequest(self.model, self.state, self.tokenizer, first, list(ids), settings, stop_ids,
                            self.context_limit, controls, cancel, detail, reused, start, time.perf_counter() - start)
        result = yield from decode_loop(req)
        self._fed.extend(result.absorbed)
        yield result.done

    def _prefill(self, ids: list[int], controls: Controls, cancel: threading.Event) -> tuple[Forward, int]:
        """Bring the state to `ids` minus what it already holds; return the next-token logits."""
        if controls.state_key != self._state_key:
            # What the state holds was computed under other controls: it does not continue under these.
            self.reset()
            self._state_key = controls.state_key
        snap = self._prompt_snap
        if snap is not None and snap[0] == tuple(ids):
            # Same prompt again (regenerate): restore the state and logits it ended with.
            self.state.restore(snap[1])
            self._fed = list(ids)
            return Forward(snap[2].logits.clone(), snap[2].steps), len(ids)
        common = 0
        for a, b in zip(self._fed, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run to produce logits
        if common < len(self._fed):
            if self.state.can_trim:
                self.state.trim(common)
                self._fed = self._fed[:common]
            elif snap is not None and len(snap[0]) < len(ids) and tuple(ids[:len(snap[0])]) == snap[0]:
                self.state.restore(snap[1])
                self._fed, common = list(snap[0]), len(snap[0])
            else:
                self.state.reset()
                self._fed, common = [], 0
        try:
            first = feed(self.model, self.state, ids[common:], self.device, controls, cancel)
        except Interrupted:
            self._fed = list(ids[:self.state.length])  # the state holds a prefix of the prompt
            raise
        self._fed = list(ids)
        if not self.state.can_trim:
            self._prompt_snap = (tuple(ids), self.state.snapshot(), Forward(first.logits.clone(), first.steps))
        return first, common

    def reset(self) -> None:
        """Forget everything the state holds."""
        self.state.reset()
        self._fed = []
        self._prompt_snap = None

    def snapshot(self) -> object:
        return (list(self._fed), self.state.snapshot())

    def restore(self, snap: object) -> None:
        fed, state_snap = snap  # type: ignore[misc]
        self.state.restore(state_snap)
        self._fed = list(fed)

    def memory(self) -> MemoryReport:
        b = self.state.bytes()
        alloc: dict[str, int] = {}
        if self.device.type == "cuda":
            alloc = {"allocated": torch.cuda.memory_allocated(self.device),
                     "reserved": torch.cuda.memory_reserved(self.device),
                     "peak": torch.cuda.max_memory_allocated(self.device)}
        else:
            alloc = {"rss": _rss_bytes()}
        return MemoryReport(weights=self.model.weight_bytes(), allocated=b.allocated, used=b.used,
                            context_used=self.state.length, context_limit=self.context_limit,
                            device=str(self.device), allocator=alloc)

    def info(self) -> dict[str, Any]:
        """Figures the UI shows beside the model (and needs for the KV "ghost" line)."""
        return {"model_id": self.entry_id, "name": self.entry.name, "architecture": self.entry.architecture,
                "n_layers": self.model.n_layers, "hidden_size": self.model.hidden_size,
                "params": sum(p.numel() for p in self.model.parameters()),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "context_limit": self.context_limit, "demo": self.entry.demo}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def model_files(entry: ModelEntry) -> Path:
    """The entry's local directory: the demo checkpoint (made on first use) or the downloaded snapshot."""
    from .. import hub
    from .demo import ensure_demo

    if entry.demo:
        return ensure_demo(entry)
    d = hub.local_dir(entry)
    if d is None:
        raise LoadError(f"{entry.id} is not downloaded yet; run `smollchat download {entry.id}` "
                        f"(about {entry.source.size_bytes / 1e9:.1f} GB)" if entry.source else
                        f"{entry.id} is not downloaded yet")
    return d


def entry_for_directory(path: Path, catalog: dict[str, ModelEntry] | None = None) -> ModelEntry:
    """A catalog-like entry for a local model directory: the chat format and tokenizer of the
    catalog's (non-demo) entry with the same architecture."""
    config = read_config(path)
    arch = config["model_type"]
    catalog = catalog if catalog is not None else load_catalog()
    base = next((e for e in catalog.values() if e.architecture == arch and not e.demo), None)
    if base is None:
        raise CatalogError(f"{path}: model_type {arch!r} has no catalog entry to take a chat format from")
    return replace(base, id=str(path), name=f"{base.name} (local: {Path(path).name})", source=None,
                   extra_sources=(), demo=False, path=Path(path))


def load_engine(entry: ModelEntry, device: str = "auto", dtype: str = "auto", model_dir: Path | None = None,
                progress: Callable[[str], None] | None = None) -> Engine:
    """Load an entry (or a local directory) onto a device; `progress` receives short stage names."""
    say = progress or (lambda _msg: None)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, entry.cpu_dtype)
    if dev.type == "cpu" and dt == torch.float16:
        raise LoadError("float16 is not supported on CPU; use float32 or bfloat16")
    say("locating files")
    directory = Path(model_dir) if model_dir else (entry.path if entry.path and entry.path.is_dir() else model_files(entry))
    say("loading tokenizer")
    tok_file = None
    if entry.tokenizer.kind == "hf-json" and not (directory / entry.tokenizer.file).exists() and not entry.demo:
        from .. import hub
        tok_file = hub.file_path(entry, entry.tokenizer.file)
    tokenizer = load_tokenizer(entry, directory, tok_file)
    say("loading weights")
    model = load_model(directory, dev, dt, options=entry.options)
    vocab = model.vocab_size
    too_big = [s for s, i in tokenizer.specials.items() if i >= vocab]
    if too_big:
        raise LoadError(f"tokenizer special(s) {too_big} have ids beyond the model's vocabulary ({vocab}); "
                        "the tokenizer does not belong to this checkpoint")
    limit = min(entry.context, model.max_context)
    say("allocating state")
    return Engine(model, tokenizer, entry, dev, dt, limit)


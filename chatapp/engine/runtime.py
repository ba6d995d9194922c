"""The engine handle the chat layer holds: a loaded model, its tokenizer and one preallocated state.

`load_engine(entry)` resolves the entry's files (a downloaded snapshot, or the demo checkpoint made
on first use), loads the model strictly and allocates the state for the whole context once.
`Engine.generate` reuses what its prompt cache holds (the live state, or a snapshot of an earlier
one) for the longest prefix of the new prompt, computed under the same state-changing controls.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..catalog import CatalogError, ModelEntry, load_catalog
from ..units import human_bytes
from ..contract import (ControlChannel, ControlSpec, Controls, Done, MemoryReport, SamplingSettings, StepEvent,
                        TokenDetail, resolve_controls)
from .arch.base import Forward, Interrupted
from .decisions import resolve_threads
from .generate import DecodeRequest, decode_loop, feed
from .graphs import MODES as COMPILE_MODES, CompileReport, decode_step
from .prompt_cache import DEFAULT_BUDGET, PromptCache
from .loader import LoadError, load_model, read_config, resolve_device, resolve_dtype
from .tokenizer import Tokenizer, load_tokenizer


class NonFiniteOutput(RuntimeError):
    """The model computed NaN/Inf logits (checked once per call, at the first step)."""


class Engine:
    """A loaded model ready to generate. Fits `api.EngineProtocol`."""

    def __init__(self, model, tokenizer: Tokenizer, entry: ModelEntry, device: torch.device, dtype: torch.dtype,
                 context_limit: int, prompt_cache_bytes: int = DEFAULT_BUDGET, quantize: str = "none") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.entry = entry
        self.entry_id = entry.id
        self.device = device
        self.dtype = dtype
        self.context_limit = context_limit
        self.quantize = quantize  # the weight-only quantization the model was loaded with (engine/quant.py)
        # What a replay must match besides the settings (run cards; load_engine fills them in).
        self.checkpoint_sha256 = ""
        self.machine: dict[str, Any] = {}
        choice = getattr(model, "kernel_choice", None)
        # The weight layout and matmul path (kernels.py) as a run card records it, and the intra-op threads.
        self.kernels: dict[str, str] = choice.as_dict() if choice is not None else {}
        self.threads = torch.get_num_threads()
        self.controls: tuple[ControlSpec, ...] = tuple(model.control_specs())
        unknown = set(entry.controls) - {c.name for c in self.controls}
        if unknown:
            raise LoadError(f"{entry.id}: the catalog sets control(s) {', '.join(sorted(unknown))}, which this "
                            f"model does not have ({', '.join(c.name for c in self.controls) or 'none'})")
        resolve_controls(self.controls, entry.controls)  # a catalog value this model refuses fails the load
        self.state = model.make_state(context_limit, device, dtype)
        self.cache = PromptCache(self.state, prompt_cache_bytes)
        # The one-token step the decode loop runs: model.infer, or the compiled one load_engine sets.
        self.step: Callable[..., Forward] = model.infer
        self.compile = CompileReport("off", False, "--compile off")
        self._running: threading.Event | None = None  # the cancel flag of the call holding the lock
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
                 detail: TokenDetail = TokenDetail(), channel: ControlChannel | None = None
                 ) -> Iterator[StepEvent | Done]:
        """Stream a reply to the prompt `ids`; see contract.StepEvent / contract.Done.

        `controls` are complete `Controls` (a chat session's) or a partial dict merged over the catalog's
        here; `cancel` is this call's own flag (set it to stop this call, even before it starts);
        `channel` carries control changes into this call, read between tokens.
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
                events = self._stream(ids, settings, stop_ids, controls, cancel, detail, channel)
                while True:
                    with torch.inference_mode():
                        event = next(events, None)
                    if event is None:
                        return
                    yield event
            finally:
                self._running = None

    def _stream(self, ids: list[int], settings: SamplingSettings, stop_ids: frozenset[int], controls: Controls,
                cancel: threading.Event, detail: TokenDetail, channel: ControlChannel | None = None
                ) -> Iterator[StepEvent | Done]:
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
        if not bool(torch.isfinite(first.logits).all()):  # one check of one row: sampling NaN streams garbage
            raise NonFiniteOutput("the model's first logits are NaN/Inf: its weights or config values are broken "
                                  "(finite but out of range); this checkpoint cannot produce text as it is")
        req = DecodeRequest(self.model, self.state, self.tokenizer, first, list(ids), settings, stop_ids,
                            self.context_limit, controls, cancel, detail, reused, start, time.perf_counter() - start,
                            step=self.step, channel=channel, **self._checkpoints(ids))
        try:
            result = yield from decode_loop(req)
        except BaseException:
            # An error, or the consumer stopped listening before Done: what the state holds is not known.
            self.cache.lost()
            raise
        if result.control_changes:
            self.cache.lost()  # tokens computed under other controls than the cache's key says
        else:
            self.cache.absorbed(result.absorbed)
        yield result.done

    def _checkpoints(self, ids: list[int]) -> dict[str, Any]:
        """DecodeRequest fields that snapshot a state which cannot drop tokens every `cache.every` tokens
        of the reply (a branch inside it then resumes near the branch point); none for a trimmable one."""
        if self.state.can_trim or self.cache.every <= 0:
            return {}
        return {"checkpoint": lambda fed: self.cache.inside_reply([*ids, *fed]), "checkpoint_every": self.cache.every}

    def state_key(self, controls: Controls) -> tuple:
        """Everything besides the tokens that decides what the state holds (the prompt cache's key)."""
        return (str(self.dtype), self.quantize, controls.state_key)

    def _prefill(self, ids: list[int], controls: Controls, cancel: threading.Event) -> tuple[Forward, int]:
        """Bring the state to `ids` from what the prompt cache holds; return the prompt's last forward."""
        reused, first = self.cache.begin(self.state_key(controls), ids)
        if first is not None:
            return first, reused
        try:
            first = feed(self.model, self.state, ids[reused:], self.device, controls, cancel)
        except Interrupted:
            self.cache.interrupted(ids)
            raise
        except BaseException:
            self.cache.lost()
            raise
        self.cache.prompt_done(ids, first)
        return first, reused

    def reset(self) -> None:
        """Forget everything the state and the prompt cache hold."""
        self.cache.clear()

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
                            device=str(self.device), allocator=alloc, prompt_cache=self.cache.nbytes)

    def info(self) -> dict[str, Any]:
        """Figures the UI shows beside the model (and needs for the KV "ghost" line)."""
        return {"model_id": self.entry_id, "name": self.entry.name, "architecture": self.entry.architecture,
                "n_layers": self.model.n_layers, "hidden_size": self.model.hidden_size,
                "params": sum(p.numel() for p in self.model.parameters()),
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "context_limit": self.context_limit, "demo": self.entry.demo, "compile": self.compile.label,
                "quantize": self.quantize, "kernels": self.kernels, "threads": self.threads,
                "checkpoint_sha256": self.checkpoint_sha256, "machine": dict(self.machine)}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def checkpoint_hash(directory: Path) -> str:
    """sha256 naming a checkpoint's weights: its one shard's, or that of its shards' hashes in order
    (hashed once per file and remembered, as for the quantization cache)."""
    from .loader import safetensors_files
    from .quant import _hash_file

    hashes = [_hash_file(p) for p in safetensors_files(directory)]
    return hashes[0] if len(hashes) == 1 else hashlib.sha256(" ".join(hashes).encode()).hexdigest()


def machine(device: torch.device) -> dict[str, Any]:
    """What picks the kernels besides the dtype: CPU model and PyTorch's kernel family, or the GPU; torch."""
    from .decisions import cpu_info

    cpu = cpu_info()
    out = {"cpu": cpu["model"], "kernels": f"cpu {cpu['aten_cpu_capability']}", "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out["kernels"] = f"cuda sm_{major}{minor} {torch.cuda.get_device_name(device)}"
    return out


def model_files(entry: ModelEntry) -> Path:
    """The entry's local directory: the demo checkpoint (made on first use) or the downloaded snapshot."""
    from .. import hub
    from .demo import ensure_demo

    if entry.demo:
        return ensure_demo(entry)
    d = hub.local_dir(entry)
    if d is None:
        raise LoadError(f"{entry.id} is not downloaded yet; run `smollchat download {entry.id}` "
                        f"(about {human_bytes(entry.source.size_bytes)})" if entry.source else
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


def _quantization(entry: ModelEntry, asked: str | None, device: torch.device) -> str:
    """The weight-only quantization to load with: the one asked for, else the catalog's CPU default."""
    from ..catalog import QUANTIZE

    quant = entry.quantize if asked is None else asked
    if quant not in QUANTIZE:
        raise LoadError(f"quantize must be one of {', '.join(QUANTIZE)}, not {quant!r}")
    if quant != "none" and device.type != "cpu":
        if asked is None:
            return "none"  # the catalog's default is a CPU default
        raise LoadError(f"--quantize {quant} runs on PyTorch's packed CPU kernels; use --device cpu or --quantize none")
    return quant


def load_engine(entry: ModelEntry, device: str = "auto", dtype: str = "auto", model_dir: Path | None = None,
                progress: Callable[[str], None] | None = None, compile: str = "auto",
                quantize: str | None = None, kernels: Any = "auto", threads: int | None = None) -> Engine:
    """Load an entry (or a local directory) onto a device; `progress` receives short stage names.

    `compile` ("auto", "on", "off"): the decode step through torch.compile (engine/graphs.py); the outcome is
    `engine.compile` (a CompileReport: mode, compile seconds, or why eager). `kernels`: the weight layout and
    matmul path ("auto": measured once per machine; "reference": --eager's; a run card's recorded choice).
    `threads`: intra-op threads for this process (None: $SMOLLCHAT_THREADS, else decisions.default_threads)."""
    say = progress or (lambda _msg: None)
    if compile not in COMPILE_MODES:
        raise LoadError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {compile!r}")
    try:
        torch.set_num_threads(resolve_threads(threads))
    except ValueError as e:
        raise LoadError(str(e)) from None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, entry.cpu_dtype)
    if dev.type == "cpu" and dt == torch.float16:
        raise LoadError("float16 is not supported on CPU; use float32 or bfloat16")
    quant = _quantization(entry, quantize, dev)
    say("locating files")
    directory = Path(model_dir) if model_dir else (entry.path if entry.path and entry.path.is_dir() else model_files(entry))
    say("loading tokenizer")
    tok_file = None
    if entry.tokenizer.kind == "hf-json" and not (directory / entry.tokenizer.file).exists() and not entry.demo:
        from .. import hub
        tok_file = hub.file_path(entry, entry.tokenizer.file)
    tokenizer = load_tokenizer(entry, directory, tok_file)
    say("loading weights")
    if quant != "none":
        say(f"loading weights ({quant})")
    model = load_model(directory, dev, dt, options=entry.options, state_tokens=entry.context,
                       quantize=None if quant == "none" else quant, kernels=kernels)
    vocab = model.vocab_size
    too_big = [s for s, i in tokenizer.specials.items() if i >= vocab]
    if too_big:
        raise LoadError(f"tokenizer special(s) {too_big} have ids beyond the model's vocabulary ({vocab}); "
                        "the tokenizer does not belong to this checkpoint")
    limit = min(entry.context, model.max_context)
    say("allocating state")
    engine = Engine(model, tokenizer, entry, dev, dt, limit, quantize=quant)
    engine.checkpoint_sha256, engine.machine = checkpoint_hash(directory), machine(dev)
    if compile != "off":
        say("preparing the decode step")
    engine.step, engine.compile = decode_step(model, entry.architecture, engine.state, dev, dt, compile, progress=say)
    return engine



def footprint(entry: ModelEntry, device: str = "auto", dtype: str = "auto", quantize: str | None = None):
    """The bytes `load_engine(entry, ...)` would hold, before loading (the model pool's estimate): the model
    built on the meta device from its config (the downloaded one, else the catalog's demo or bench config),
    weights in the load dtype with quantized linears at their packed size, its state for the whole context,
    plus the prompt cache's budget. Returns chat.pool.Footprint."""
    from ..chat.pool import Footprint
    from .loader import build_model, meta_bytes
    from .quant import _calls_project_head, _targets, head_weight

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, entry.cpu_dtype)
    quant = _quantization(entry, quantize, dev)
    config: dict[str, Any] = dict(entry.demo_config if entry.demo else entry.bench_config)
    if not entry.demo:
        from .. import hub
        directory = entry.path if entry.path and entry.path.is_dir() else hub.local_dir(entry)
        if directory is not None:
            config = read_config(directory)
    if not config:
        from ..chat.pool import rough_footprint
        return rough_footprint(entry)
    model = build_model(config, entry.options)
    weights, state = meta_bytes(model, dt, set(getattr(model, "FP32_TENSORS", ())), min(entry.context, model.max_context))
    if quant != "none":
        from .kernels import MIN_MEASURE_BYTES

        mats = [linear.weight.shape for _n, _p, _a, linear in _targets(model)[0]]
        head = head_weight(model) if _calls_project_head(model) else None
        # A model this large races aten's int4 layout against ours at load (kernels.py): count the larger.
        raced = sum(n * k for n, k in mats + ([head[1].shape] if head else [])) * dt.itemsize >= MIN_MEASURE_BYTES
        for n, k in mats:
            weights += _packed_bytes(quant, n, k, raced) - n * k * dt.itemsize
        if head is not None:  # a quantized copy of the head; an untied float head is released
            weights += (_packed_bytes(quant, *head[1].shape, raced)
                        - (head[1].numel() * dt.itemsize if head[0] == "lm_head" else 0))
        for _n, _p, _a, emb in _targets(model, nn.Embedding)[0]:
            # Token embeddings become int8 row lookups (engine/quant.py): the float table goes; the tied int8
            # head's table is shared, plus a 4-bit residual in int8 mode; else an own int8 copy with row scales.
            v, d = emb.weight.shape
            tied = head is not None and head[1] is emb.weight and quant == "int8"
            own = 0 if tied else v * d + 2 * v
            weights += own + (v * d // 2 if quant == "int8" else 0) - v * d * dt.itemsize
    return Footprint(weights, state + DEFAULT_BUDGET)


def _packed_bytes(quant: str, n: int, k: int, nibbles: bool = False) -> int:
    """Bytes of one [n, k] weight packed by engine/quant.py: int8 with a bf16 scale per row; int4 two to a
    byte with a bf16 scale and zero point per group of the input, else int8. aten's int4 layout rounds the rows up
    to 16, our nibbles the input up to 128: with `nibbles` (the layout is raced at load), the larger of the two."""
    from .quant import GROUPS

    group = next((g for g in GROUPS if k % g == 0), 0) if quant == "int4" else 0
    if not group:
        return n * k + 2 * n
    n16, k128 = -(-n // 16) * 16, -(-k // 128) * 128
    aten = n16 * k // 2 + (k // group) * n16 * 4
    return max(aten, n * k128 // 2 + (k128 // group) * n * 4) if nibbles else aten

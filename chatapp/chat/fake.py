"""Scripted stand-ins for the engine, the tokenizer and the downloader (tests, demos of the UI).

`FakeEngine` fits `contract.EngineProtocol`: it streams scripted replies token by token at a fixed
rate (or instantly, reporting the same fixed timings), reports fixed byte counts, honours
`cancel()` between tokens, `max_new_tokens`, stop strings and the context limit, and can declare
compute controls with per-token steps. `FakeTokenizer` is a real `engine.tokenizer.Tokenizer`
(word- or byte-level) with a ChatML format, so `Session` renders prompts exactly as it does for a
real model. `FakeDownloader` mimics `hub` for the models screen. No torch is imported.
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..catalog import ChatFormat, ModelEntry, Source, TokenizerSpec
from ..contract import (ControlChannel, ControlSpec, Controls, Done, MemoryReport, SamplingSettings, StepEvent,
                        TokenDetail, resolve_controls)
from ..hub import DownloadCancelled, DownloadProgress, OfflineError
from ..engine.tokenizer import StreamDecoder, Tokenizer

CHATML = ChatFormat(
    templates={"system": "<|im_start|>system\n{content}<|im_end|>\n",
               "user": "<|im_start|>user\n{content}<|im_end|>\n",
               "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n"},
    generation_prompt="<|im_start|>assistant\n", stop=("<|im_end|>", "<|endoftext|>"),
    default_system="You are a helpful assistant.")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

DEFAULT_REPLY = ("Hello! I am a **scripted** fake model.\n\n"
                 "```python\nprint(\"hi\")\n```\n\nAsk me anything.")

#: A Huginn-like set of compute controls, for tests of the compute panel and run cards.
HUGINN_LIKE_CONTROLS: tuple[ControlSpec, ...] = (
    ControlSpec("num_steps", "Recurrence steps", "int", 32, min=1, max=128,
                help="Depth iterations per token (more = more compute)"),
    ControlSpec("exit_criterion", "Early exit", "choice", "none",
                choices=("none", "entropy-diff", "latent-diff", "kl", "argmax-stability"),
                help="Stop iterating a token once this test passes"),
    ControlSpec("exit_threshold", "Exit threshold", "float", 5e-4, min=0.0, max=1.0,
                help="Threshold of the exit test"),
    ControlSpec("min_steps", "Minimum steps", "int", 1, min=0, max=128, help="Never exit before this many steps"),
    ControlSpec("continuous_compute", "Continuous compute", "bool", False,
                help="Start each token's recurrence from the previous token's state"),
)


class FakeTokenizer(Tokenizer):
    """A tokenizer whose vocabulary needs no files.

    mode "word": each run of whitespace plus the following non-space characters is one token (ids
    are handed out on first sight, after the specials 0-2); mode "bytes": one id per UTF-8 byte,
    specials from 256. Chat rendering is the real `Tokenizer.render` over `chat` (ChatML default).
    """

    def __init__(self, mode: str = "word", chat: ChatFormat | None = CHATML) -> None:
        if mode not in ("word", "bytes"):
            raise ValueError(f"mode must be 'word' or 'bytes', got {mode!r}")
        self.mode = mode
        base = 0 if mode == "word" else 256
        super().__init__({s: base + i for i, s in enumerate(SPECIALS)}, chat)
        self._pieces: list[str] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (an engine in its own process sends its tokenizer to the UI's): the lock stays behind.
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def encode_ordinary(self, text: str) -> list[int]:
        if self.mode == "bytes":
            return list(text.encode("utf-8"))
        out = []
        with self._lock:
            for piece in re.findall(r"\s*\S+|\s+", text):
                if piece not in self._ids:
                    self._ids[piece] = len(SPECIALS) + len(self._pieces)
                    self._pieces.append(piece)
                out.append(self._ids[piece])
        return out

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return self.special_ids[token_id].encode()
        if self.mode == "bytes":
            return bytes([token_id]) if token_id < 256 else b""
        k = token_id - len(SPECIALS)
        return self._pieces[k].encode() if 0 <= k < len(self._pieces) else b""

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS) if self.mode == "bytes" else len(SPECIALS) + len(self._pieces)


def fake_entry(model_id: str = "fake", context: int = 2048, generation: dict[str, Any] | None = None,
               controls: dict[str, Any] | None = None, chat: ChatFormat = CHATML, name: str = "Fake model",
               demo: bool = False) -> ModelEntry:
    """A catalog entry for the fake model (what `Session` reads defaults and the chat format from)."""
    return ModelEntry(
        id=model_id, name=name, architecture="fake", summary="A scripted model for tests.", params=0,
        context=context, license="n/a",
        tokenizer=TokenizerSpec(kind="bytes", specials={s: 256 + i for i, s in enumerate(SPECIALS)}),
        chat=chat, source=Source(repo=f"smollchat/{model_id}", revision="fake-rev"),
        generation=dict(generation if generation is not None else {"temperature": 0.7, "max_new_tokens": 256}),
        controls=dict(controls or {}), demo=demo)


@dataclass
class FakeCall:
    """One `generate` call as the engine received it."""

    ids: list[int]
    settings: SamplingSettings
    controls: dict[str, Any]


Reply = str | Callable[[str], str]


class FakeEngine:
    """A scripted engine that fits `EngineProtocol`.

    Args:
        entry: the catalog entry it stands for (a `fake_entry` by default; its controls are the catalog layer).
        replies: strings used in turn (cycling), or one callable(prompt_text) -> reply.
        tokenizer: defaults to a word-level FakeTokenizer.
        tokens_per_s, ttft_s: the decode rate and time to first token reported in `Done`.
        instant: True = no sleeping (timestamps follow the fixed rate anyway); False = really wait.
        context_limit: tokens the fake state holds.
        weights_bytes, kv_bytes_per_token, recurrent_bytes: what `memory()` reports.
        can_trim: whether the fake state can drop tokens like a KV cache (default: unless it reports
            recurrent bytes). A state that cannot continues only a prompt that extends what it holds,
            restarts on the same prompt from its end (regenerate), and else starts over, as the real
            engine does.
        controls: ControlSpecs the fake declares (e.g. HUGINN_LIKE_CONTROLS).
        steps: per-token steps: None, an int, a sequence (cycled) or callable(index, controls) -> int;
            with controls and no `steps`, each token uses the `num_steps` control.
        error_after: raise RuntimeError(error_message) after this many tokens (error paths).
        logprobs: per-token log-probabilities of the chosen tokens (cycled; the end-of-turn token keeps
            its own), for the token inspector's colours; by default a gentle pattern.
    """

    def __init__(self, replies: Sequence[str] | Callable[[str], str] = (DEFAULT_REPLY,),
                 tokenizer: Tokenizer | None = None, *, entry_id: str = "fake", tokens_per_s: float = 100.0,
                 ttft_s: float = 0.05, instant: bool = True, context_limit: int = 2048,
                 weights_bytes: int = 12_000_000, kv_bytes_per_token: int = 4096, recurrent_bytes: int = 0,
                 can_trim: bool | None = None, controls: tuple[ControlSpec, ...] = (), steps: Any = None, error_after: int | None = None,
                 error_message: str = "scripted engine failure", device: str = "cpu",
                 n_layers: int | None = None, hidden_size: int | None = None, params: int | None = None,
                 entry: ModelEntry | None = None, quantize: str = "none",
                 logprobs: Sequence[float] | None = None) -> None:
        if callable(replies):
            self._reply: Callable[[str], str] | None = replies
            self._replies: list[str] = []
        else:
            self._reply, self._replies = None, list(replies) or [DEFAULT_REPLY]
        self.tokenizer = tokenizer or FakeTokenizer()
        self.entry = entry or fake_entry(entry_id, context=context_limit)
        self.entry_id = self.entry.id
        self.tokens_per_s = tokens_per_s
        self.ttft_s = ttft_s
        self.instant = instant
        self.context_limit = context_limit
        self.weights_bytes = weights_bytes
        # Depth and width as Engine.info() reports them (the memory panel's dense-KV ghost needs both).
        self.n_layers, self.hidden_size, self.params = n_layers, hidden_size, params
        self.kv_bytes_per_token = kv_bytes_per_token
        self.recurrent_bytes = recurrent_bytes
        self.can_trim = recurrent_bytes == 0 if can_trim is None else can_trim
        self._last_prompt: list[int] = []
        self.controls = tuple(controls)
        self.steps = steps
        self.error_after = error_after
        self.error_message = error_message
        self.logprobs = list(logprobs) if logprobs else None
        self.device = device
        self.dtype = "float32"
        self.quantize = quantize
        self.calls: list[FakeCall] = []
        self._fed: list[int] = []
        self._running: threading.Event | None = None
        self._n = 0

    # Contract.
    def cancel(self) -> None:
        """Stop the call that is running now."""
        running = self._running
        if running is not None:
            running.set()

    def generate(self, ids: list[int], settings: SamplingSettings | None = None,
                 controls: Any = None, *, cancel: threading.Event | None = None,
                 detail: TokenDetail = TokenDetail(), channel: ControlChannel | None = None
                 ) -> Iterator[StepEvent | Done]:
        settings = settings or SamplingSettings()
        settings.validate()
        if not ids:
            raise ValueError("the prompt is empty")
        if not isinstance(controls, Controls):
            controls = resolve_controls(self.controls, self.entry.controls, call=controls)
        cancel = cancel if cancel is not None else threading.Event()
        # No queue here (unlike the real engine): a test may leave one stream open while it starts another.
        self._running = cancel
        try:
            yield from self._stream(list(ids), settings, controls, cancel, detail, channel)
        finally:
            if self._running is cancel:
                self._running = None

    def _stream(self, ids: list[int], settings: SamplingSettings, controls: Controls, cancel: threading.Event,
                want: TokenDetail, channel: ControlChannel | None = None) -> Iterator[StepEvent | Done]:
        self.calls.append(FakeCall(list(ids), settings, dict(controls)))
        prompt = len(ids)
        if prompt >= self.context_limit:
            yield Done("context_full", prompt, 0, 0.0, 0.0, 0.0,
                       detail=f"the prompt has {prompt} tokens; the context holds {self.context_limit}")
            return
        reused = self._absorb(list(ids))
        reply = self._next_reply(ids)
        cut = _first_stop(reply, settings.stop_strings)
        reply_ids = self.tokenizer.encode(reply, allow_special=False)
        eos = self._eos()
        start_ns = time.monotonic_ns()
        if not self.instant and self.ttft_s > 0:
            cancel.wait(self.ttft_s)
        detok = StreamDecoder(self.tokenizer)
        shown, new, reason, detail = 0, 0, "max_tokens", ""
        for i, tok in enumerate([*reply_ids, eos]):
            if cancel.is_set():
                reason = "cancelled"
                break
            if self.error_after is not None and i >= self.error_after:
                raise RuntimeError(self.error_message)
            if i > 0 and not self.instant and self.tokens_per_s > 0:
                cancel.wait(1.0 / self.tokens_per_s)
                if cancel.is_set():
                    reason = "cancelled"
                    break
            new += 1
            t_ns = self._t_ns(start_ns, i)
            # Like the engine: a channel's change applies from the next token on (the first comes from the prompt).
            change = channel.take(i) if channel is not None and i else {}
            if change:
                controls = resolve_controls(self.controls, call={**controls, **change})
            changed = {k: controls[k] for k in change} or None
            steps = self._steps(i, controls)
            if tok == eos:
                yield _event(tok, "", t_ns, -0.05, 0.5, steps, want, changed)
                reason = "eos"
                break
            text = detok.push(tok)
            if cut is not None and shown + len(text) > cut[0]:
                yield _event(tok, text[:max(cut[0] - shown, 0)], t_ns, -0.5, 1.5, steps, want, changed)
                reason = "stop_string"
                break
            shown += len(text)
            lp = self.logprobs[i % len(self.logprobs)] if self.logprobs else -0.5 - (i % 7) * 0.1
            yield _event(tok, text, t_ns, lp, 1.0 + (i % 5) * 0.25, steps, want, changed)
            if new >= settings.max_new_tokens:
                break
            if prompt + new >= self.context_limit:
                reason, detail = "context_full", f"the context holds {self.context_limit} tokens"
                break
            self._fed.append(tok)
        tail = detok.flush() if reason != "stop_string" else ""
        yield Done(reason, prompt, new, self.ttft_s, prompt / self.ttft_s if self.ttft_s > 0 else 0.0,
                   self.tokens_per_s if new > 1 else 0.0, reused_tokens=reused, detail=detail, text=tail)

    def memory(self) -> MemoryReport:
        n = len(self._fed)
        allocated = {"kv": self.kv_bytes_per_token * self.context_limit, "recurrent": self.recurrent_bytes}
        used = {"kv": self.kv_bytes_per_token * n, "recurrent": self.recurrent_bytes}
        return MemoryReport(weights=self.weights_bytes, allocated=allocated, used=used, context_used=n,
                            context_limit=self.context_limit, device=self.device, allocator={"rss": 0})

    def reset(self) -> None:
        self._fed = []

    def info(self) -> dict[str, Any]:
        out = {"model_id": self.entry_id, "name": "Fake model", "architecture": "fake", "device": self.device,
               "dtype": self.dtype, "context_limit": self.context_limit, "demo": False, "quantize": self.quantize}
        figures = {"n_layers": self.n_layers, "hidden_size": self.hidden_size, "params": self.params}
        return {**out, **{k: v for k, v in figures.items() if v is not None}}

    # Helpers.
    def _eos(self) -> int:
        """The id a reply ends with: the chat format's first stop token."""
        try:
            stops = self.tokenizer.stop_ids
        except Exception:
            stops = ()
        return stops[0] if stops else self.tokenizer.specials.get("<|im_end|>", 0)

    def _absorb(self, ids: list[int]) -> int:
        """Like the real engine: keep the common prefix with what the state holds, feed the rest."""
        common = 0
        for a, b in zip(self._fed, ids):
            if a != b:
                break
            common += 1
        if not self.can_trim and common < len(self._fed):
            # No dropping tokens: the same prompt again restarts from its end, anything else from zero.
            reused = len(ids) if ids == self._last_prompt else 0
        else:
            reused = min(common, len(ids) - 1)  # at least one token must run to produce logits
        self._fed = list(ids)
        self._last_prompt = list(ids)
        return reused

    def _next_reply(self, ids: list[int]) -> str:
        if self._reply is not None:
            return self._reply(self.tokenizer.decode(ids))
        reply = self._replies[self._n % len(self._replies)]
        self._n += 1
        return reply

    def _steps(self, i: int, controls: dict[str, Any]) -> int | None:
        s = self.steps
        if s is None:
            return int(controls["num_steps"]) if "num_steps" in controls else None
        if callable(s):
            return s(i, controls)
        if isinstance(s, int):
            return s
        return list(s)[i % len(s)]

    def _t_ns(self, start_ns: int, i: int) -> int:
        if not self.instant:
            return time.monotonic_ns()
        rate = self.tokens_per_s or 1.0
        return start_ns + int((self.ttft_s + i / rate) * 1e9)


#: The scripted demo's chosen-token log-probabilities: mostly sure, now and then not (the token inspector).
DEMO_LOGPROBS = tuple(math.log(p) for p in (0.97, 0.88, 0.64, 0.99, 0.41, 0.93, 0.18, 0.99, 0.72, 0.07, 0.95, 0.83))


def scripted_demo() -> FakeEngine:
    """The engine `smollchat --fake` opens the TUI on: no model and no torch, streaming at a real pace
    (40 tok/s), with Huginn-like compute controls whose per-token steps vary as early exit would, a
    constant recurrent state plus a small KV cache, and depth and width for the memory panel's ghost."""

    def reply(prompt: str) -> str:
        # The rendered ChatML prompt: quote the last user turn.
        last = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0].strip()
        asked = " ".join(last.split())[:80] or "nothing"
        full = (f"You asked: *{asked}*\n\nThis is the **scripted fake engine**: no model is loaded, so this "
                "answer is canned. Everything around it is real: the stream, the stop key, the run card, "
                "the memory panel and the compute panel.\n\n- edit a message to branch\n- regenerate for a "
                "sibling\n- Esc stops and keeps the partial reply\n\n```python\nprint(\"hello from smollchat\")\n```")
        # Continue: the prompt ends inside the open reply; go on from where that text stops.
        written = prompt.rsplit("<|im_start|>assistant\n", 1)[-1]
        if "<|im_end|>" not in written and full.startswith(written):
            return full[len(written):]
        return full

    def steps(i: int, controls: dict[str, Any]) -> int:
        cap = int(controls.get("num_steps", 32))
        if controls.get("exit_criterion", "none") == "none":
            return cap
        return max(int(controls.get("min_steps", 1)), min(cap, 4 + (i * 7) % max(cap - 3, 1)))

    return FakeEngine(reply, entry_id="fake", tokens_per_s=40.0, ttft_s=0.15, instant=False, context_limit=4096,
                      weights_bytes=276_000_000, kv_bytes_per_token=2048, recurrent_bytes=6 * 2**20, can_trim=False,
                      controls=HUGINN_LIKE_CONTROLS, steps=steps, n_layers=24, hidden_size=768, params=138_000_000,
                      logprobs=DEMO_LOGPROBS)


def _event(tok: int, text: str, t_ns: int, logprob: float, entropy: float, steps: int | None,
           detail: TokenDetail, changed: dict[str, Any] | None = None) -> StepEvent:
    """A scripted token with the figures `detail` asks for (alternatives: the token, then worse guesses)."""
    alts = tuple((tok + j, logprob - j) for j in range(detail.alternatives)) if detail.alternatives else None
    return StepEvent(tok, text, t_ns, logprob if detail.logprob else None, entropy if detail.entropy else None,
                     alts, steps, changed)


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(position, length) of the earliest stop string in text."""
    hits = [(text.find(s), len(s)) for s in stops if s and s in text]
    return min(hits) if hits else None


# The downloader fake mirrors `hub` and raises its error types.
@dataclass
class FakeDownloader:
    """A scripted `hub`: download with progress, cancel, resume, offline and failure cases.

    Args:
        files: (name, size in bytes) of every entry's download.
        chunk_bytes: bytes per progress event.
        speed_bps: the speed reported (and, with `delay_s`, roughly simulated).
        delay_s: sleep per chunk (0 = instant).
        offline: every download raises OfflineError before any byte.
        fail_at: raise OfflineError (connection lost) once this many bytes are done; cleared after it fires.
        root: where "downloaded" entries get a directory.
    """

    files: Sequence[tuple[str, int]] = (("model.safetensors", 4_000_000), ("config.json", 1_000))
    chunk_bytes: int = 500_000
    speed_bps: float = 5_000_000.0
    delay_s: float = 0.0
    offline: bool = False
    fail_at: int | None = None
    root: Path | None = None
    done: dict[str, int] = field(default_factory=dict)
    downloaded: set[str] = field(default_factory=set)
    events: list[DownloadProgress] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def download(self, entry: ModelEntry, progress: Callable[[DownloadProgress], None] | None = None,
                 cancel: threading.Event | None = None) -> Path:
        """Fetch the entry's files, resuming where a previous attempt stopped."""
        if entry.id in self.downloaded:
            return self._dir(entry)
        if self.offline:
            raise OfflineError(f"{entry.id}: no network connection and the files are not downloaded")
        total, done = self.total_bytes, self.done.get(entry.id, 0)
        offset = 0
        for index, (name, size) in enumerate(self.files):
            end = offset + size
            while done < end:
                if cancel is not None and cancel.is_set():
                    self.done[entry.id] = done
                    raise DownloadCancelled(f"{entry.id}: download cancelled ({done} of {total} bytes kept)")
                if self.fail_at is not None and done >= self.fail_at:
                    self.fail_at = None
                    self.done[entry.id] = done
                    raise OfflineError(f"{entry.id}: connection lost at {done} of {total} bytes; retry to resume")
                done = min(done + self.chunk_bytes, end)
                if self.delay_s:
                    time.sleep(self.delay_s)
                event = DownloadProgress(name, done, total, self.speed_bps,
                                         (total - done) / self.speed_bps if self.speed_bps else None,
                                         file_index=index, file_count=len(self.files))
                self.events.append(event)
                if progress is not None:
                    progress(event)
            offset = end
        self.done[entry.id] = total
        self.downloaded.add(entry.id)
        return self._dir(entry)

    def is_downloaded(self, entry: ModelEntry) -> bool:
        return entry.demo or entry.id in self.downloaded

    def local_dir(self, entry: ModelEntry) -> Path | None:
        return self._dir(entry) if entry.id in self.downloaded else None

    def disk_usage(self, entry: ModelEntry) -> int:
        return self.done.get(entry.id, 0)

    def delete(self, entry: ModelEntry) -> None:
        self.downloaded.discard(entry.id)
        self.done.pop(entry.id, None)

    def _dir(self, entry: ModelEntry) -> Path:
        if self.root is None:
            from ..locations import cache_dir
            self.root = cache_dir() / "fake-hub"
        d = Path(self.root) / entry.id
        d.mkdir(parents=True, exist_ok=True)
        return d

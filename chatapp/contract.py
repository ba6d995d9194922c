"""The seam between the chat layer and an engine: what `chat/` and `tui/` may use of one. No torch.

- `EngineProtocol`: tokenizer, entry, info, generate, cancel, memory report. `engine.runtime.Engine` and
  `chat.fake.FakeEngine` implement it; nothing else of an engine is reached from outside it.
- `SamplingSettings` and `ControlSpec`, with the one validator of both: `SamplingSettings.validate` and
  `resolve_controls`, which merges architecture defaults < catalog entry < chat < call into the complete,
  checked `Controls` that every `generate` call carries (nothing of a call stays on the engine).
- `StepEvent`, the per-token record (its optional figures are computed only when a `TokenDetail` asks),
  `Done` at the end of a call, `MemoryReport`.

The TUI imports this before any model is loaded, so it must never import torch (DESIGN.md, layout).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

if TYPE_CHECKING:
    from .catalog import ModelEntry
    from .engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class ControlSpec:
    """One per-architecture compute control, rendered generically by the TUI.

    Attributes:
        name: the key used in `controls` dicts, catalog defaults and golden.json.
        label: short human label.
        type: "int" | "float" | "choice" | "bool" | "str".
        default: the value used when nothing sets it.
        min, max: bounds for int/float.
        choices: allowed values for "choice".
        help: one line shown beside the control.
        changes_state: whether the value changes what the model's state holds after a token (the
            prompt cache keys its snapshots by these); False for controls that only change how the
            same result is computed (e.g. a speculative draft that is verified at full depth).
        check: the architecture's own rule for a value its type and range allow (e.g. a cache
            strategy's ring size); raises ValueError.
        live: whether a running reply may change it (ControlChannel); False where what the state
            already holds is laid out by it (a cache strategy).
    """

    name: str
    label: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""
    changes_state: bool = True
    check: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)
    live: bool = True

    def coerce(self, value: Any) -> Any:
        """Convert and validate a value for this control; raise ValueError with a clear message."""
        try:
            if self.type == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                v: Any = int(value)
            elif self.type == "float":
                v = value if isinstance(value, str) and value == "auto" else float(value)
            elif self.type == "bool":
                v = _bool(value)
            else:
                v = value if self.type != "str" else str(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"control {self.name!r} expects {_A[self.type]}, got {value!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"control {self.name!r} must be a finite number; got {v}")
        if self.type == "choice" and self.choices and not _choice_ok(v, self.choices):
            raise ValueError(f"control {self.name!r} must be one of {', '.join(map(str, self.choices))}; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if self.min is not None and v < self.min or self.max is not None and v > self.max:
                raise ValueError(f"control {self.name!r} must be within [{_bound(self.min)}, {_bound(self.max)}]; "
                                 f"got {v}")
        if self.check is not None:
            try:
                self.check(v)
            except ValueError as e:
                raise ValueError(f"control {self.name!r}: {e}") from None
        return v


_A = {"int": "an integer", "float": "a number", "bool": "true or false", "choice": "one of its choices",
      "str": "a string"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _bound(b: float | None) -> str:
    return "..." if b is None else f"{b:g}"


def _choice_ok(v: Any, choices: tuple[Any, ...]) -> bool:
    # A trailing "*" marks a family of choices such as "compress-s*" (any integer after the prefix).
    for c in choices:
        if isinstance(c, str) and c.endswith("*") and isinstance(v, str) and v.startswith(c[:-1]):
            return True
        if v == c:
            return True
    return False


class Controls(Mapping):
    """The complete, validated control values of one call (made only by `resolve_controls`)."""

    __slots__ = ("_values", "_state_key", "specs")

    def __init__(self, values: dict[str, Any], state_key: tuple[tuple[str, Any], ...],
                 specs: tuple[ControlSpec, ...]) -> None:
        self._values = dict(values)
        self._state_key = state_key
        self.specs = specs  # what they were validated against

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Controls({self._values!r})"

    @property
    def state_key(self) -> tuple[tuple[str, Any], ...]:
        """The values that change what the state holds (part of the prompt cache's key)."""
        return self._state_key


def resolve_controls(specs: tuple[ControlSpec, ...], catalog: Mapping[str, Any] | None = None,
                     chat: Mapping[str, Any] | None = None, call: Mapping[str, Any] | None = None) -> Controls:
    """Merge architecture defaults (the specs) < catalog entry < chat < call and validate every value.

    Unknown names in a call raise ValueError. The catalog and chat layers may name controls this model
    does not declare (a chat continued on another model, an entry paired with a stand-in engine): those
    are left out. The engine checks its own catalog entry's names when it loads.
    """
    if catalog is None and chat is None and isinstance(call, Controls) and call.specs is specs:
        return call  # resolved already, against these very specs (the per-forward case)
    by_name = {s.name: s for s in specs}
    values = {s.name: s.default for s in specs}
    for layer in (catalog, chat, call):
        if isinstance(layer, Controls) and layer.specs == specs:
            values.update(layer)  # already validated against the same specs
            continue
        for name, value in (layer or {}).items():
            spec = by_name.get(name)
            if spec is None:
                if layer is not call:
                    continue
                raise ValueError(f"unknown control {name!r}; this model's controls are: "
                                 f"{', '.join(by_name) or 'none'}")
            values[name] = spec.coerce(value)
    return Controls(values, tuple((s.name, values[s.name]) for s in specs if s.changes_state), specs)


@dataclass(frozen=True)
class SamplingSettings:
    """Decoding settings. temperature 0 means greedy; 0/None disables a filter."""

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    seed: int | None = None
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()

    def with_overrides(self, **kw: Any) -> "SamplingSettings":
        """A copy with the non-None keyword values applied (unknown names raise TypeError)."""
        names = {f.name for f in fields(self)}
        bad = set(kw) - names
        if bad:
            raise TypeError(f"unknown sampling settings: {', '.join(sorted(bad))}")
        kw = {k: (tuple(v) if k in ("stop_strings", "stop_ids") else v) for k, v in kw.items() if v is not None}
        return replace(self, **kw)

    def validate(self) -> None:
        """Raise ValueError naming the first setting of the wrong type or out of range."""
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float),
                           ("repetition_penalty", float), ("no_repeat_ngram", int), ("max_new_tokens", int)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
            if not ok:
                raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}; got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number; got {v}")
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("no_repeat_ngram", self.no_repeat_ngram >= 0, ">= 0"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}; got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64); got {self.seed!r}")


@dataclass(frozen=True)
class TokenDetail:
    """Which optional figures each StepEvent carries; the engine computes none that is not asked for.

    `final`: the chosen token's log-probability and the alternatives come from the distribution after the
    sampling settings (penalties, n-gram ban, temperature, top-k/p, min-p; under greedy the penalised
    scores at temperature 1, since the sampled distribution there is one-hot) instead of the model's raw
    softmax. The entropy is always the raw distribution's.
    """

    logprob: bool = False
    entropy: bool = False
    alternatives: int = 0
    final: bool = False

    @property
    def any(self) -> bool:
        return self.logprob or self.entropy or self.alternatives > 0


#: What a chat run card records per token.
RUN_CARD_DETAIL = TokenDetail(logprob=True, entropy=True)
#: What the token inspector shows: the run card's figures plus the top 5 alternatives.
INSPECT_DETAIL = TokenDetail(logprob=True, entropy=True, alternatives=5)


@dataclass(frozen=True)
class StepEvent:
    """One generated token.

    Attributes:
        token_id: the sampled id.
        text: the streamed text delta (never a broken UTF-8 sequence; may be "").
        t_ns: monotonic time when the token was ready.
        logprob: log-probability of the token under the model's raw distribution, or the final sampling
            one when `TokenDetail.final` (when asked).
        entropy: entropy (nats) of the model's raw next-token distribution (when asked).
        alternatives: the most likely (token id, log-probability) pairs of the same distribution as
            `logprob`, most likely first; ids the settings removed are left out (when asked).
        steps: recurrence steps the token's forward ran (Huginn), else None. Always filled: the forward
            reports it anyway, so it costs nothing.
        controls_changed: the control values a ControlChannel changed that took effect at this token.
    """

    token_id: int
    text: str
    t_ns: int
    logprob: float | None = None
    entropy: float | None = None
    alternatives: tuple[tuple[int, float], ...] | None = None
    steps: int | None = None
    controls_changed: dict[str, Any] | None = None


def check_live(specs: tuple[ControlSpec, ...], values: Mapping[str, Any]) -> None:
    """ValueError when `values` name a control a running reply cannot change (ControlSpec.live)."""
    fixed = [s.name for s in specs if not s.live and s.name in values]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change while a reply streams (the state is laid out by it); "
                         "change it for the next reply")


class ControlChannel:
    """Control changes for one running `generate` call, read by the engine between tokens.

    The caller owns it and passes it to that call alone; nothing of it stays on the engine or the model.
    `set` (any thread) queues values that take effect at the next token whose forward has not started;
    the engine checks them when it takes them. `schedule` ({token index: values}) applies changes at
    given tokens instead (a replay of a run card's recorded changes).
    """

    def __init__(self, schedule: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._schedule = {int(k): dict(v) for k, v in (schedule or {}).items()}
        self._relay: Callable[[dict[str, Any]], None] | None = None

    def set(self, values: Mapping[str, Any]) -> None:
        with self._lock:
            relay = self._relay
            if relay is None:
                self._pending.update(values)
        if relay is not None:
            relay(dict(values))

    def relay(self, send: Callable[[dict[str, Any]], None] | None
              ) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
        """Hand every later `set` to `send` (an engine in another process, whose own channel takes them);
        returns the schedule and the pending values, which that channel starts with. None ends it."""
        with self._lock:
            self._relay = send
            if send is None:
                return {}, {}
            out = ({k: dict(v) for k, v in self._schedule.items()}, dict(self._pending))
            self._schedule, self._pending = {}, {}
            return out

    def take(self, token_index: int) -> dict[str, Any]:
        """The changes that apply from token `token_index` on (scheduled there, then set since the last
        take); {} when there are none."""
        with self._lock:
            out = {**self._schedule.pop(token_index, {}), **self._pending}
            self._pending.clear()
            return out


STOP_REASONS = ("eos", "stop_string", "max_tokens", "cancelled", "context_full")
#: The engine's intra-op thread count when no --threads is given (read where the engine loads, so a UI that
#: cannot import torch sets it for the engine; engine/decisions.py has the default).
THREADS_ENV = "SMOLLCHAT_THREADS"


@dataclass(frozen=True)
class Done:
    """The end of one generation.

    stop_reason is one of STOP_REASONS. `text` is streamed text held back until the end (a partial stop
    string that never completed, or an incomplete UTF-8 sequence); append it to the reply.
    `reused_tokens` is the prompt prefix the engine's prompt cache skipped ("prefill skipped N tokens").
    """

    stop_reason: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    reused_tokens: int = 0
    detail: str = ""
    text: str = ""


@dataclass(frozen=True)
class MemoryReport:
    """Bytes by kind plus allocator figures.

    Attributes:
        weights: parameter bytes.
        allocated: state bytes allocated, by kind ("kv", "recurrent", "conv", "other").
        used: state bytes holding information, by kind.
        context_used, context_limit: tokens in the state and the most it can hold.
        device: "cpu" or "cuda:N".
        allocator: torch allocator figures where the device has them (bytes).
        prompt_cache: bytes held by the prompt cache's snapshots.
    """

    weights: int
    allocated: dict[str, int]
    used: dict[str, int]
    context_used: int
    context_limit: int
    device: str
    allocator: dict[str, int] = field(default_factory=dict)
    prompt_cache: int = 0

    @property
    def state_total(self) -> int:
        return sum(self.allocated.values())


class EngineProtocol(Protocol):
    """Everything `chat/` and `tui/` may use of an engine.

    `info()` returns the figures the UI shows: model_id, name, architecture, device, dtype,
    context_limit, demo, and where known n_layers, hidden_size, params.
    `generate` streams StepEvents and one final Done; `channel` carries control changes into the running
    call (they take effect at the next token and are reported on it). `cancel` (an Event the caller owns) stops that
    call alone, even while it waits for the engine; `cancel()` stops whichever call is running now.
    """

    entry_id: str
    entry: "ModelEntry"
    tokenizer: "Tokenizer"
    controls: tuple[ControlSpec, ...]
    context_limit: int

    def info(self) -> dict[str, Any]: ...

    def generate(self, ids: list[int], settings: SamplingSettings | None = None,
                 controls: Mapping[str, Any] | None = None, *, cancel: threading.Event | None = None,
                 detail: TokenDetail = TokenDetail(), channel: ControlChannel | None = None
                 ) -> Iterator[StepEvent | Done]: ...

    def cancel(self) -> None: ...

    def memory(self) -> MemoryReport: ...

"""The engine's contract types, importable without torch.

`chat` and `tui` see the engine only through these records and the `EngineProtocol` below; the TUI
imports this module before any model is loaded, so it must never import torch (DESIGN.md, layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Protocol


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
    """

    name: str
    label: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""

    def coerce(self, value: Any) -> Any:
        """Convert and validate a value for this control; raise ValueError with a clear message."""
        try:
            if self.type == "int":
                v: Any = int(value)
            elif self.type == "float":
                v = value if isinstance(value, str) and value == "auto" else float(value)
            elif self.type == "bool":
                v = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            else:
                v = value if self.type != "str" else str(value)
        except (TypeError, ValueError):
            raise ValueError(f"control {self.name!r} expects a {self.type}, got {value!r}") from None
        if self.type == "choice" and self.choices and not _choice_ok(v, self.choices):
            raise ValueError(f"control {self.name!r} must be one of {', '.join(map(str, self.choices))}; got {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if self.min is not None and v < self.min or self.max is not None and v > self.max:
                raise ValueError(f"control {self.name!r} must be within [{self.min}, {self.max}]; got {v}")
        return v


def _choice_ok(v: Any, choices: tuple[Any, ...]) -> bool:
    # A trailing "*" marks a family of choices such as "compress-s*" (any integer after the prefix).
    for c in choices:
        if isinstance(c, str) and c.endswith("*") and isinstance(v, str) and v.startswith(c[:-1]):
            return True
        if v == c:
            return True
    return False


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
        """Raise ValueError naming the first setting out of range."""
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


@dataclass(frozen=True)
class StepEvent:
    """One generated token.

    Attributes:
        token_id: the sampled id.
        text: the streamed text delta (never a broken UTF-8 sequence; may be "").
        logprob: log-probability of the token under the final sampling distribution.
        entropy: entropy (nats) of the model's raw next-token distribution.
        steps: recurrence steps used for this token (Huginn), else None.
        t_ns: monotonic time when the token was ready.
    """

    token_id: int
    text: str
    logprob: float
    entropy: float
    steps: int | None
    t_ns: int


@dataclass(frozen=True)
class Done:
    """The end of one generation.

    stop_reason is one of "eos" | "stop_string" | "max_tokens" | "cancelled" | "context_full".
    `text` is streamed text held back until the end (a partial stop string that never completed,
    or an incomplete UTF-8 sequence); append it to the reply.
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


STOP_REASONS = ("eos", "stop_string", "max_tokens", "cancelled", "context_full")


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
    """

    weights: int
    allocated: dict[str, int]
    used: dict[str, int]
    context_used: int
    context_limit: int
    device: str
    allocator: dict[str, int] = field(default_factory=dict)

    @property
    def state_total(self) -> int:
        return sum(self.allocated.values())


class EngineProtocol(Protocol):
    """What the chat layer may call. `chatapp.engine.runtime.Engine` and `chat.fake.FakeEngine` fit it."""

    entry_id: str
    controls: tuple[ControlSpec, ...]
    context_limit: int

    def generate(self, ids: list[int], settings: SamplingSettings,
                 controls: dict[str, Any] | None = None) -> Iterator[StepEvent | Done]: ...

    def cancel(self) -> None: ...

    def memory(self) -> MemoryReport: ...

    def snapshot(self) -> object: ...

    def restore(self, snap: object) -> None: ...

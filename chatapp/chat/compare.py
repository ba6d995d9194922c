"""Side-by-side compare: the last user turn of a chat answered twice, by two models or one model with two
settings, each on a scratch copy of the chat, then either reply (or both) kept in the real tree.

A side is a model id plus `NAME=VALUE` words: sampling settings (temperature=0, seed=1, ...), load options
(quantize=int8, dtype=bfloat16: another form of the model, a pool variant) or compute controls
(num_steps=4, exit_criterion=kl; checked against the model's own controls once it is loaded). Engines come
from the model pool; `plan` says whether the two runs can stream at once: only when they use two engines
that fit the pool's budget together. Nothing here knows about Textual (tui/screens/compare.py shows it).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

from ..catalog import QUANTIZE
from ..contract import Done, SamplingSettings, StepEvent
from ..units import human_bytes
from .conversation import Conversation, Message
from .pool import ModelPool
from .presets import builtin_preset
from .session import Session

_SETTINGS = {f.name: f for f in fields(SamplingSettings)}
_ALIASES = {"max_tokens": "max_new_tokens", "stop": "stop_strings"}
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Side:
    """One half of a comparison."""

    label: str
    model_id: str
    settings: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)
    quantize: str | None = None
    dtype: str | None = None

    def describe(self) -> str:
        words = [*(f"{k}={v}" for k, v in self.settings.items()), *(f"{k}={v}" for k, v in self.controls.items()),
                 *([f"quantize={self.quantize}"] if self.quantize else []),
                 *([f"dtype={self.dtype}"] if self.dtype else [])]
        return " ".join([self.model_id, *words])


def parse_side(label: str, model_id: str, text: str) -> Side:
    """`model_id` plus "NAME=VALUE ..." -> Side; ValueError naming the word to fix."""
    settings: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    load: dict[str, str] = {}
    for word in text.split():
        name, eq, value = word.partition("=")
        name = _ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
        if not eq or not name or not value:
            raise ValueError(f"side {label}: {word!r} is not NAME=VALUE (e.g. num_steps=4 temperature=0 quantize=int8)")
        if name == "quantize":
            if value not in QUANTIZE:
                raise ValueError(f"side {label}: quantize must be one of {', '.join(QUANTIZE)}; got {value!r}")
            load[name] = value
        elif name == "dtype":
            if value not in DTYPES:
                raise ValueError(f"side {label}: dtype must be one of {', '.join(DTYPES)}; got {value!r}")
            load[name] = value
        elif name in _SETTINGS:
            settings[name] = _setting(label, name, value)
        else:
            controls[name] = value
    try:
        SamplingSettings().with_overrides(**settings).validate()
    except ValueError as e:
        raise ValueError(f"side {label}: {e}") from None
    return Side(label, model_id, settings, controls, load.get("quantize"), load.get("dtype"))


def _setting(label: str, name: str, value: str) -> Any:
    if name in ("stop_strings", "stop_ids"):
        items = [v for v in value.split(",") if v]
        return items if name == "stop_strings" else [_num(label, name, v, int) for v in items]
    kind = float if isinstance(_SETTINGS[name].default, float) else int
    return _num(label, name, value, kind)


def _num(label: str, name: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"side {label}: {name} expects {'a number' if kind is float else 'an integer'}; "
                         f"got {value!r}") from None


@dataclass(frozen=True)
class Plan:
    """The pool keys of the two sides and whether they stream at once, with the sentence that says why."""

    keys: tuple[str, str]
    parallel: bool
    note: str


def plan(pool: ModelPool, a: Side, b: Side) -> Plan:
    keys = (pool.variant(a.model_id, a.quantize, a.dtype), pool.variant(b.model_id, b.quantize, b.dtype))
    if keys[0] == keys[1]:
        return Plan(keys, False, f"One after the other: both sides use one engine ({keys[0]}), which runs one reply "
                                 "at a time.")
    cost = [pool.cost(k) for k in keys]
    budget = human_bytes(pool.budget)
    if pool.fits_together(list(keys)):
        return Plan(keys, True, f"Side by side: both engines fit the {budget} memory budget together "
                                f"({human_bytes(cost[0])} + {human_bytes(cost[1])}).")
    return Plan(keys, False, f"One after the other: {keys[0]} ({human_bytes(cost[0])}) and {keys[1]} "
                             f"({human_bytes(cost[1])}) do not fit the {budget} memory budget together, beside the "
                             "engines in use.")


def last_user_turn(conv: Conversation) -> Message:
    """The user message the chat's current path last asks (ValueError when there is none)."""
    path = conv.path() if conv.current_leaf else []
    user = next((m for m in reversed(path) if m.role == "user"), None)
    if user is None:
        raise ValueError("Compare needs a chat with a message: send one first, then compare two answers to it.")
    return user


def scratch(conv: Conversation, side: Side, parent_id: str,
            presets: Callable[[str], dict | None] | None) -> Conversation:
    """A copy of `conv` (same ids) whose settings and controls are the chat's with the side's on top (the
    chat's preset, built-in or saved, resolved here: the scratch session has no store)."""
    copy = Conversation.from_dict(conv.to_dict())
    own = dict(conv.settings)
    preset = own.pop("preset", None)
    base: dict[str, Any] = {}
    if preset:
        found = builtin_preset(preset)
        if found is None and presets is not None:
            found = presets(preset)
        if found is None:
            raise ValueError(f"this chat uses preset {preset!r}, which does not exist (any more); pick another "
                             "in the chat settings")
        base = dict(found)
    copy.settings = {**base, **own, **side.settings}
    copy.controls = {**conv.controls, **side.controls}
    copy.current_leaf = parent_id
    return copy


@dataclass
class Result:
    """One side's run: its scratch chat and session, the reply and its figures."""

    side: Side
    key: str
    conv: Conversation | None = None
    session: Session | None = None
    message_id: str | None = None
    done: Done | None = None
    error: str | None = None
    steps: list[int] = field(default_factory=list)
    state_bytes: int | None = None

    @property
    def reply(self) -> Message | None:
        return self.conv.messages.get(self.message_id) if self.conv is not None and self.message_id else None

    @property
    def text(self) -> str:
        reply = self.reply
        return reply.content if reply is not None else ""

    def figures(self) -> dict[str, Any]:
        """tokens, tok/s, steps/token (None without recurrence), state bytes (None before the run ends)."""
        reply, done = self.reply, self.done
        return {"tokens": done.new_tokens if done else len(reply.token_ids or ()) if reply is not None else 0,
                "tok_s": done.decode_tok_s if done else None,
                "steps_per_token": sum(self.steps) / len(self.steps) if self.steps else None,
                "state_bytes": self.state_bytes}


def run_side(pool: ModelPool, result: Result, conv: Conversation, parent_id: str, *, cancel: threading.Event,
             presets: Callable[[str], dict | None] | None = None, progress: Callable[[str], None] | None = None
             ) -> Iterator[StepEvent | Done]:
    """Stream one side: take its engine from the pool (loading it if needed, pinned while it runs), answer
    `parent_id` on a scratch copy of `conv`, record the figures in `result`; errors land in `result.error`."""
    say = progress or (lambda _s: None)
    try:
        say(f"loading {result.key}" if result.key not in pool.slots else "starting")
        engine = pool.acquire(result.key, say)
    except Exception as e:
        result.error = _error(e)
        return
    try:
        if cancel.is_set():
            result.error = "stopped before it started"
            return
        result.conv = scratch(conv, result.side, parent_id, presets)
        session = result.session = Session(engine, entry=pool.entries[result.key])
        session.controls_for(result.conv, result.side.controls)  # a control this model lacks fails here, clearly
        say("streaming")
        for ev in session.stream(result.conv, parent_id):
            if cancel.is_set():
                session.cancel()  # stops before the next token; the stream ends with Done("cancelled")
            if result.message_id is None:
                result.message_id = result.conv.current_leaf
            if isinstance(ev, StepEvent) and ev.steps is not None:
                result.steps.append(ev.steps)
            if isinstance(ev, Done):
                result.done = ev
                result.state_bytes = sum(session.memory().used.values())
            yield ev
    except Exception as e:
        result.error = _error(e)
    finally:
        pool.release(result.key)


def _error(e: BaseException) -> str:
    name = type(e).__name__
    return str(e) if name in ("PoolError", "ValueError", "LoadError", "ContextOverflow") else f"{name}: {e}"


def keep(chosen: list[Result], results: list[Result], conv: Conversation, store: Any = None) -> list[Message]:
    """Put the `chosen` finished replies into `conv` as siblings under the compared turn, each with its run
    card (whose "compare" entry names its setup and the other side's) and token record; returns them."""
    kept = []
    for r in chosen:
        reply = r.reply
        if reply is None or r.session is None or reply.status == "streaming":
            raise ValueError(f"side {r.side.label} has no finished reply to keep" + (f": {r.error}" if r.error else ""))
        other = next((o.side.describe() for o in results if o is not r), "")
        note = {"side": r.side.label, "setup": r.side.describe(), "with": other}
        kept.append(r.session.keep(conv, reply, store=store, note=note))
    return kept

"""One request's generation: checked against the model, rendered, streamed, and turned into OpenAI objects.

Chat requests go through the chat `Session` (the same prompt rendering, context trimming and run
cards as the TUI) on a conversation built from the request's messages; raw completions through the
session's raw-text path (`Session.complete`: no template, the format's BOS first).
Everything here reaches an engine through `contract.EngineProtocol` only.

Logprobs: a token's `logprob` is its log-probability under the distribution it was drawn from (after
temperature and top-p), as the run cards record it; `top_logprobs` are the most likely tokens of the
model's raw next-token distribution (the engine's per-token `alternatives`).
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..chat.conversation import Conversation
from ..chat.session import ContextOverflow, Session
from ..contract import Done, StepEvent, TokenDetail, resolve_controls
from .schema import ApiError, ChatRequest, CompletionRequest

#: Our setting names as the API calls them (validation messages name what the client sent).
_API_NAMES = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}
_FINISH = {"eos": "stop", "stop_string": "stop", "cancelled": "stop", "max_tokens": "length", "context_full": "length"}


class _Detailed:
    """An engine seen through the contract, asking every call for `detail` as well (top_logprobs)."""

    def __init__(self, engine: Any, detail: TokenDetail) -> None:
        self._engine, self._detail = engine, detail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, ids, settings=None, controls=None, *, cancel=None, detail: TokenDetail = TokenDetail()):
        want = TokenDetail(logprob=detail.logprob or self._detail.logprob, entropy=detail.entropy or
                           self._detail.entropy, alternatives=max(detail.alternatives, self._detail.alternatives))
        return self._engine.generate(ids, settings, controls, cancel=cancel, detail=want)


@dataclass
class Prepared:
    """A checked request ready to run, and the response it builds from the events it is given."""

    chat: bool
    model: str
    tokenizer: Any
    controls: dict[str, Any]
    start: Callable[[Any, Any], Iterator[StepEvent | Done]]  # (engine, cancel Event) -> events
    stop: Callable[[], None]
    logprobs: int | None  # None: not asked; else how many alternatives
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    done: Done | None = None

    # Events in.
    def add(self, ev: StepEvent | Done) -> list[dict[str, Any]]:
        """Record an event; return the stream chunks it makes."""
        if isinstance(ev, Done):
            self.done = ev
            out = [self._chunk(ev.text, None)] if ev.text else []
            if ev.text:
                self.text.append(ev.text)
            return out + [self._chunk(None, None, _FINISH.get(ev.stop_reason, "stop"))]
        if ev.token_id in self._stops and not ev.text:
            return []  # the stop token itself is not part of the answer
        self.text.append(ev.text)
        entry = self._entry(ev) if self.logprobs is not None else None
        if entry is not None:
            self.entries.append(entry)
        return [self._chunk(ev.text, entry)] if ev.text or entry else []

    @property
    def _stops(self) -> set[int]:
        return set(getattr(self.tokenizer, "stop_ids", ()))

    def _entry(self, ev: StepEvent) -> dict[str, Any]:
        token = self._token(ev.token_id)
        top = [{"token": (t := self._token(i)), "logprob": lp, "bytes": list(t.encode())}
               for i, lp in (ev.alternatives or ())[:self.logprobs]]
        return {"token": token, "logprob": ev.logprob, "bytes": list(token.encode()), "top_logprobs": top}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # Objects out.
    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.id}", "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, text: str | None, entry: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": {} if text is None else {"content": text},
                      "logprobs": {"content": [entry]} if entry else None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": _legacy([entry]) if entry else None,
                  "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def chunk_start(self) -> dict[str, Any]:
        """The first stream event: the role (chat), and the complete controls this call runs with."""
        first = self._chunk("", None)
        if self.chat:
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return {**first, "smollchat": {"controls": self.controls}}

    def usage(self) -> dict[str, int]:
        new = self.done.new_tokens if self.done else 0
        prompt = self.done.prompt_tokens if self.done else self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def chunk_usage(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage()}

    def response(self) -> dict[str, Any]:
        text = "".join(self.text)
        finish = _FINISH.get(self.done.stop_reason, "stop") if self.done else "stop"
        extra = {"controls": self.controls, "stop_reason": self.done.stop_reason if self.done else "cancelled"}
        if self.chat:
            logprobs = {"content": self.entries} if self.logprobs is not None else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(), "smollchat": extra}
        choice = {"index": 0, "text": text, "logprobs": _legacy(self.entries) if self.logprobs is not None else None,
                  "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(), "smollchat": extra}


def _legacy(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The completions API's logprobs layout."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _settings(defaults: Any, overrides: dict[str, Any]) -> Any:
    try:
        settings = defaults.with_overrides(**overrides)
        settings.validate()
    except ValueError as e:
        raise _setting_error(e) from None
    return settings


def _setting_error(e: ValueError) -> ApiError:
    text = str(e)
    name = text.split(" ", 1)[0]
    api = _API_NAMES.get(name, name)
    return ApiError(400, api + text[len(name):], param=api, code="invalid_value")


def _controls(engine: Any, wanted: dict[str, Any]) -> dict[str, Any]:
    """The complete controls for this call (architecture < catalog < request), checked like --control."""
    try:
        return dict(resolve_controls(engine.controls, engine.entry.controls, None, wanted))
    except ValueError as e:
        raise ApiError(400, str(e), param="smollchat.controls", code="invalid_value") from None


def _too_long(used: int, limit: int, reserve: int) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
                         f"{used} tokens, and {reserve} are kept for the reply (max_tokens, at most half the "
                         "context). Shorten the input or lower max_tokens.", param="messages",
                    code="context_length_exceeded")


def prepare_chat(engine: Any, req: ChatRequest, recorder: Any = None) -> Prepared:
    """Check a chat request against its model and render its prompt (runs off the event loop)."""
    detail = TokenDetail(logprob=True, entropy=True, alternatives=req.top_logprobs)
    session = Session(_Detailed(engine, detail) if req.top_logprobs else engine,
                      store=recorder.store if recorder is not None else None)
    conv = conversation_of(req.messages)
    conv.settings = dict(req.settings)
    try:
        settings = session.settings_for(conv)
    except ValueError as e:
        raise _setting_error(e) from None
    controls = _controls(engine, req.controls)
    conv.controls = {k: controls[k] for k in req.controls}
    try:
        prompt = session.prompt(conv, settings=settings)
    except ContextOverflow:
        prompt = None
    if prompt is None or prompt.dropped:
        full = engine.tokenizer.render([{"role": m.role, "content": m.content} for m in conv.path()],
                                       add_generation_prompt=True, system=conv.system_prompt)
        reserve = min(settings.max_new_tokens, engine.context_limit // 2)
        raise _too_long(len(full), engine.context_limit, reserve)

    def start(_engine: Any, _cancel: Any) -> Iterator[StepEvent | Done]:
        if recorder is None:
            yield from session.stream(conv, conv.current_leaf)
            return
        with recorder.lock:
            target = recorder.attach(conv, engine.entry.id)
            yield from session.stream(target, target.current_leaf)
            recorder.remember(target)

    return Prepared(True, req.model, engine.tokenizer, controls, start, session.cancel,
                    req.top_logprobs if req.logprobs else None, len(prompt.ids))


def conversation_of(messages: list[tuple[str, str]]) -> Conversation:
    """A chat tree (one branch) from request messages: leading system messages are its system prompt."""
    n_sys = next((i for i, (role, _) in enumerate(messages) if role != "system"), len(messages))
    system = "\n\n".join(c for _, c in messages[:n_sys]) if n_sys else None
    conv = Conversation(system_prompt=system)  # titled by its first user message
    parent = None
    for role, content in messages[n_sys:]:
        parent = conv.add(parent, role, content).id
    return conv


def prepare_completion(engine: Any, req: CompletionRequest) -> Prepared:
    """Check a raw-text request and ready the session's raw path (no chat template)."""
    settings = _settings(engine.entry.sampling(), req.settings)
    controls = _controls(engine, req.controls)
    detail = TokenDetail(logprob=req.logprobs is not None, alternatives=req.logprobs or 0)
    cancel = threading.Event()
    try:
        events = Session(engine).complete(req.prompt, settings, req.controls, cancel=cancel, detail=detail)
    except ContextOverflow as e:
        raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt", code="invalid_value") from None
    return Prepared(False, req.model, engine.tokenizer, controls, lambda _engine, _cancel: events, cancel.set,
                    req.logprobs, 0)

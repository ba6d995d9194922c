"""OpenAI request bodies -> checked requests, and OpenAI's error shape.

Every field is checked for its type here, so a client gets one 400 naming the parameter instead of a
500; ranges are then checked by the contract's validators (SamplingSettings.validate, resolve_controls),
the same ones the CLI uses. Fields real clients send that change nothing here (`user`, `metadata`,
`store`, `service_tier`, ...) are ignored. Features that cannot be honoured are refused with a 400 that
says so: `n` > 1, tools and function calls, JSON response formats, `logit_bias`, `echo`, `suffix`,
`best_of` > 1, audio. `presence_penalty` and `frequency_penalty` are refused when non-zero: they are
additive penalties by count, our repetition penalty is multiplicative on every seen token, so mapping
one onto the other would silently change what a client asked for; send `repetition_penalty` in the
`smollchat` extra field instead.

Model-specific controls (Huginn's num_steps, exit_criterion, ...) and our other sampling settings travel
in the extra body field `smollchat`: {"controls": {...}, "top_k": 40, "min_p": 0.05,
"repetition_penalty": 1.1, "no_repeat_ngram": 3}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Largest request body accepted (a full context of text is far below this).
MAX_BODY_BYTES = 4 * 2**20
#: OpenAI's own limits.
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_EXTRA_SETTINGS = {"top_k": int, "min_p": float, "repetition_penalty": float, "no_repeat_ngram": int}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_error", 500: "server_error"}.get(
                                 status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Common:
    """What chat and raw completions share."""

    model: str
    stream: bool = False
    include_usage: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # SamplingSettings overrides
    controls: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatRequest(Common):
    messages: list[tuple[str, str]] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class CompletionRequest(Common):
    prompt: str = ""
    logprobs: int | None = None  # the legacy API's count of alternatives (0 = only the sampled token's)


def _bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _typed(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name, None)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(name, f"'{name}' must be {what}; got {type(value).__name__} {_show(value)}", "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number; got {value}")
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse(body: dict[str, Any]) -> None:
    """400 for what a request asks that cannot be honoured (silently ignoring it would mislead)."""
    n = _typed(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise _bad("n", f"'n' = {n} is not supported: this server generates one choice per request; send n=1 "
                   "(or several requests)", "unsupported_value")
    for name in ("tools", "functions", "audio"):
        if body.get(name):
            raise _bad(name, f"'{name}' is not supported: the models served here have no tool or audio use",
                       "unsupported_parameter")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise _bad(name, f"'{name}' is not supported: no tools are available", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format", "only response_format {'type': 'text'} is supported (no JSON mode)",
                   "unsupported_value")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "'logit_bias' is not supported", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _typed(body, name, (int, float), "a number", 0) != 0:
            raise _bad(name, f"'{name}' is not supported (additive penalties); send \"smollchat\": "
                       "{\"repetition_penalty\": 1.1} for the multiplicative one", "unsupported_parameter")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise _bad("modalities", "only the 'text' modality is supported", "unsupported_value")


def _common(body: Any, cls: type, max_tokens_names: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = _typed(body, "model", (str,), "a string")
    if not model:
        raise _bad("model", "'model' is required: one of the ids GET /v1/models lists", "missing_required_parameter")
    _refuse(body)
    stream = _typed(body, "stream", (bool,), "true or false", False)
    opts = _typed(body, "stream_options", (dict,), "an object", {})
    include_usage = _typed(opts, "include_usage", (bool,), "true or false", False)
    settings: dict[str, Any] = {}
    for api, ours, kinds, what in (("temperature", "temperature", (int, float), "a number"),
                                   ("top_p", "top_p", (int, float), "a number"),
                                   ("seed", "seed", (int,), "an integer")):
        value = _typed(body, api, kinds, what)
        if value is not None:
            settings[ours] = value
    for name in max_tokens_names:
        value = _typed(body, name, (int,), "an integer")
        if value is not None:
            settings["max_new_tokens"] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise _bad("stop", f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
        settings["stop_strings"] = stop
    extra = _typed(body, "smollchat", (dict,), "an object", {})
    controls = _typed(extra, "controls", (dict,), "an object", {})
    unknown = set(extra) - set(_EXTRA_SETTINGS) - {"controls"}
    if unknown:
        raise _bad("smollchat", f"unknown field(s) in 'smollchat': {', '.join(sorted(unknown))}; known: controls, "
                   f"{', '.join(_EXTRA_SETTINGS)}", "unknown_parameter")
    for name, kind in _EXTRA_SETTINGS.items():
        value = _typed(extra, name, (int,) if kind is int else (int, float), "an integer" if kind is int else "a number")
        if value is not None:
            settings[name] = value
    return cls(model=model, stream=stream, include_usage=include_usage, settings=settings, controls=controls), body


def parse_chat(body: Any) -> ChatRequest:
    req, body = _common(body, ChatRequest, ("max_tokens", "max_completion_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects",
                   "missing_required_parameter" if messages is None else "invalid_type")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"'{where}' must be an object with 'role' and 'content'", "invalid_type")
        role = _ROLES.get(m.get("role"))
        if role is None:
            raise _bad(f"{where}.role", f"'{where}.role' must be system, developer, user or assistant; got "
                       f"{_show(m.get('role'))} (tool messages are not supported)")
        req.messages.append((role, _content(m.get("content"), f"{where}.content")))
    if req.messages[-1][0] != "user":
        raise _bad("messages", "the last message must be the user's (this server answers it)")
    req.logprobs = _typed(body, "logprobs", (bool,), "true or false", False)
    req.top_logprobs = _typed(body, "top_logprobs", (int,), "an integer", 0)
    if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", f"'top_logprobs' must be within [0, {MAX_TOP_LOGPROBS}]")
    if req.top_logprobs and not req.logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return req


def _content(value: Any, where: str) -> str:
    """Text content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(where, f"'{where}' parts must be {{'type': 'text', 'text': ...}} (only text is supported)")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(where, f"'{where}' must be a string or a list of text parts", "invalid_type")


def parse_completion(body: Any) -> CompletionRequest:
    req, body = _common(body, CompletionRequest, ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "'prompt' must be a non-empty string (one prompt per request; token-id prompts are "
                   "not supported)", "invalid_type" if prompt is not None else "missing_required_parameter")
    req.prompt = prompt
    if body.get("echo"):
        raise _bad("echo", "'echo' is not supported", "unsupported_parameter")
    if body.get("suffix"):
        raise _bad("suffix", "'suffix' is not supported (no fill-in-the-middle)", "unsupported_parameter")
    if _typed(body, "best_of", (int,), "an integer", 1) != 1:
        raise _bad("best_of", "'best_of' > 1 is not supported", "unsupported_value")
    req.logprobs = _typed(body, "logprobs", (int,), "an integer")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LEGACY_LOGPROBS:
        raise _bad("logprobs", f"'logprobs' must be within [0, {MAX_LEGACY_LOGPROBS}]")
    return req

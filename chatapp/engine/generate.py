"""The prefill/decode loop: a DecodeRequest in, StepEvent records out, a DecodeResult (with the Done) back.

The loop is model-agnostic. Per token it costs one model call on a preallocated state and one host
round trip (the sampled id, needed to stream text). Stop ids, stop strings, the token budget, the
context limit and cancellation are checked here, between model calls; a model whose single call is long
(Huginn at many recurrence steps) also polls the call's cancel flag inside it and raises Interrupted.
Everything one call needs travels in its DecodeRequest; what the state absorbed comes back in the
DecodeResult, so nothing of a call is left on the model.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping

import torch

from ..contract import (ControlChannel, Controls, Done, SamplingSettings, StepEvent, TokenDetail, check_live,
                        resolve_controls)
from .arch.base import Forward, Interrupted, check_cancel
from .sample import Sampler
from .state import ContextFull, StateList
from .token_detail import NO_DETAIL, token_detail
from .tokenizer import StreamDecoder, Tokenizer

#: Prompt tokens per prefill call: bounds the attention mask and activation memory of long prompts.
PREFILL_CHUNK = 512


def feed(model, state: StateList, ids: list[int], device, controls: Mapping[str, Any] | None = None,
         cancel: threading.Event | None = None) -> Forward:
    """Feed ids through the model in chunks; return the last position's logits [V] and its steps.

    A cancel raises Interrupted between chunks (or inside one, where the model polls it); the state
    then holds a prefix of `ids`, `state.length` long.
    """
    out = None
    for i in range(0, len(ids), PREFILL_CHUNK):
        if i:
            check_cancel(cancel)
        chunk = torch.tensor([ids[i:i + PREFILL_CHUNK]], device=device)
        out = model.infer(chunk, state, controls, cancel, last_only=True)
    assert out is not None, "prefill needs at least one token"
    return Forward(out.logits[0, -1], out.steps)


def prefill(model, state: StateList, ids: list[int], device) -> torch.Tensor:
    """`feed` under the model's default controls: the last position's logits [V]."""
    return feed(model, state, ids, device).logits


class StopStrings:
    """Holds back streamed text that might be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(i for i, _ in hits)
            out, self.pending = self.pending[:at], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def roll_back(state: StateList, held: int) -> None:
    """After an interrupted forward, make the state hold exactly the `held` tokens it had absorbed (a
    speculative draft may have left extra positions; an interrupted forward leaves none)."""
    if state.length > held:
        state.trim(held)


@dataclass
class DecodeRequest:
    """One call's decoding: the state after the prompt, the logits it ended with and everything that
    shapes what comes next.

    Attributes:
        first: the prompt's last forward (next-token logits [V] and the steps it ran).
        prompt: the prompt ids (the state holds them all).
        stop_ids: the settings' stop ids plus the tokenizer's.
        reused: prompt tokens the prompt cache skipped.
        start_s, prefill_s: perf_counter at the call's start, seconds the prefill took.
        step: what runs one decode token (`infer`'s signature): the model's infer, or the engine's compiled
            step (engine/graphs.py); None is model.infer.
        channel: control changes read between tokens (contract.ControlChannel), this call's own.
        checkpoint: called with the ids absorbed after the prompt each time `checkpoint_every` more were
            absorbed (the prompt cache's snapshots inside a reply), while the controls are the call's own.
    """

    model: Any
    state: StateList
    tokenizer: Tokenizer
    first: Forward
    prompt: list[int]
    settings: SamplingSettings
    stop_ids: frozenset[int]
    context_limit: int
    controls: Mapping[str, Any]
    cancel: threading.Event
    detail: TokenDetail = TokenDetail()
    reused: int = 0
    start_s: float = 0.0
    prefill_s: float = 0.0
    step: Callable[..., Forward] | None = None
    channel: ControlChannel | None = None
    checkpoint: Callable[[list[int]], None] | None = None
    checkpoint_every: int = 0


@dataclass
class DecodeResult:
    """How a decode ended (`done`, for the caller to emit once it has recorded the rest) and the ids the
    state absorbed after the prompt, in order."""

    done: Done
    absorbed: list[int] = field(default_factory=list)
    #: (token index, the values changed) for each ControlChannel change, in order.
    control_changes: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def decode_loop(req: DecodeRequest) -> Generator[StepEvent, None, DecodeResult]:
    """Sample from `req.first`, stream, feed back; returns (`result = yield from decode_loop(req)`) the
    DecodeResult. A consumer may stop listening at Done, so the caller records the result before it
    yields the Done."""
    model, state, settings = req.model, req.state, req.settings
    logits, steps = req.first.logits, req.first.steps
    device = logits.device
    sampler = Sampler(settings, logits.shape[-1], device, req.prompt)
    detok = StreamDecoder(req.tokenizer)
    stops = StopStrings(settings.stop_strings)
    fed: list[int] = []
    new, first_t, last_t = 0, None, None
    reason, detail = "max_tokens", ""
    want = req.detail
    step = req.step or model.infer
    # Self-speculative decoding (Huginn): under plain greedy a model that offers a speculator returns
    # several next tokens per call, each with the logits plain decoding would have produced.
    plain_greedy = settings.temperature == 0 and settings.repetition_penalty == 1.0 and settings.no_repeat_ngram == 0
    # A draft runs ahead of the token being shown, so a call whose controls may change decodes without one.
    spec = model.speculator(req.controls, req.cancel) if plain_greedy and req.channel is None else None
    pending: list[tuple[torch.Tensor, int | None]] = []
    controls = req.controls
    changes: list[tuple[int, dict[str, Any]]] = []
    while True:
        if req.cancel.is_set():
            reason = "cancelled"
            break
        token = sampler.draw(logits)
        # The figures of token_detail only when asked: a call that asks for none pays nothing for them.
        extra = token_detail(logits, token, want, sampler) if want.any else dict(NO_DETAIL)
        extra["steps"] = steps
        if changes and changes[-1][0] == new:
            extra["controls_changed"] = changes[-1][1]
        now = time.perf_counter()
        first_t = first_t or now
        last_t = now
        new += 1
        if token in req.stop_ids:
            yield StepEvent(token, "", time.monotonic_ns(), **extra)
            reason = "eos"
            break
        text, hit = stops.feed(detok.push(token))
        yield StepEvent(token, text, time.monotonic_ns(), **extra)
        if hit:
            reason = "stop_string"
            break
        if new >= settings.max_new_tokens:
            break
        if len(req.prompt) + new >= req.context_limit:
            reason, detail = "context_full", f"the context holds {req.context_limit} tokens"
            break
        sampler.extend([token])
        try:
            if spec is not None and not pending:
                ahead = spec.step(state, token)
                # The state absorbed the chosen token and every returned one but the last.
                fed.append(token)
                fed.extend(tok for tok, _, _ in ahead[:-1])
                pending = [(lg, st) for _, lg, st in ahead]
            if pending:
                logits, steps = pending.pop(0)
                continue
            if req.channel is not None:
                controls = _changed(model, controls, req.channel.take(new), new, changes)
            out = step(torch.tensor([[token]], device=device), state, controls, req.cancel,
                       last_only=True)
        except ContextFull as e:
            reason, detail = "context_full", str(e)
            break
        except Interrupted:
            # Stopped inside a forward (Huginn polls between recurrence steps): the token was sampled and
            # shown but not absorbed.
            reason = "cancelled"
            roll_back(state, len(req.prompt) + len(fed))
            break
        logits, steps = out.logits[0, -1], out.steps
        fed.append(token)
        if req.checkpoint is not None and not changes and len(fed) % req.checkpoint_every == 0:
            req.checkpoint(fed)
    tail = ""
    if reason != "stop_string":
        tail, hit = stops.feed(detok.flush())
        tail += "" if hit else stops.flush()
    decode_s = (last_t - first_t) if first_t and last_t else 0.0
    n_prefill = len(req.prompt) - req.reused
    done = Done(
        stop_reason=reason, prompt_tokens=len(req.prompt), new_tokens=new,
        ttft_s=(first_t - req.start_s) if first_t else 0.0,
        prefill_tok_s=n_prefill / req.prefill_s if req.prefill_s > 0 else 0.0,
        decode_tok_s=(new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
        reused_tokens=req.reused, detail=detail, text=tail)
    return DecodeResult(done, fed, changes)


def _changed(model, controls: Mapping[str, Any], change: dict[str, Any], index: int,
             changes: list[tuple[int, dict[str, Any]]]) -> Mapping[str, Any]:
    """`controls` with a channel's change applied (checked like any call's), noted in `changes` as
    beginning at token `index`; unchanged when there is none."""
    if not change:
        return controls
    specs = controls.specs if isinstance(controls, Controls) else tuple(model.control_specs())
    check_live(specs, change)
    merged = resolve_controls(specs, call={**controls, **change})
    changes.append((index, {k: merged[k] for k in change}))
    return merged

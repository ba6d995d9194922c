"""The prefill/decode loop: ids in, StepEvent records out, then one Done.

The loop is model-agnostic. Per token it costs one model call on a preallocated state and one host
round trip (the sampled id, needed to stream text). Stop ids, stop strings, the token budget, the
context limit and cancellation are checked here, between model calls; a model whose single call is long
(Huginn at many recurrence steps) also polls the cancel flag inside it and raises Interrupted.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from ..contract import Done, SamplingSettings, StepEvent
from .sample import Sampler
from .arch.base import Interrupted
from .state import ContextFull, StateList
from .tokenizer import StreamDecoder, Tokenizer

#: Prompt tokens per prefill call: bounds the attention mask and activation memory of long prompts.
PREFILL_CHUNK = 512


@dataclass
class Timer:
    start: float
    prefill_s: float = 0.0
    first_token: float | None = None
    last_token: float | None = None


def prefill(model, state: StateList, ids: list[int], device) -> torch.Tensor:
    """Feed ids through the model in chunks; return the last position's logits [V].

    A cancel raises Interrupted between chunks (or inside one, where the model polls it); the state
    then holds a prefix of `ids`, `state.length` long.
    """
    logits = None
    for i in range(0, len(ids), PREFILL_CHUNK):
        if i:
            model.check_interrupt()
        chunk = torch.tensor([ids[i:i + PREFILL_CHUNK]], device=device)
        logits = model(chunk, state, last_only=True)[0, -1]
    assert logits is not None, "prefill needs at least one token"
    return logits


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


def roll_back(state: StateList, fed: list[int]) -> None:
    """After an interrupted forward, make the state hold exactly `fed` again (a speculative draft may
    have left extra positions; an interrupted forward leaves none)."""
    if state.length > len(fed):
        state.trim(len(fed))


def decode_loop(model, state: StateList, logits: torch.Tensor, prompt: list[int], tokenizer: Tokenizer,
                settings: SamplingSettings, stop_ids: set[int], context_limit: int, cancel: threading.Event,
                timer: Timer, fed: list[int], reused: int = 0) -> Iterator[StepEvent | Done]:
    """Sample from `logits`, stream, feed back; `fed` receives every id the state absorbs."""
    device = logits.device
    sampler = Sampler(settings, logits.shape[-1], device, prompt)
    detok = StreamDecoder(tokenizer)
    stops = StopStrings(settings.stop_strings)
    new = 0
    reason, detail = "max_tokens", ""
    steps = model.last_steps
    # Self-speculative decoding (Huginn): under plain greedy a model that offers `speculate` returns
    # several next tokens per call, each with the logits plain decoding would have produced.
    speculate = (settings.temperature == 0 and settings.repetition_penalty == 1.0 and settings.no_repeat_ngram == 0
                 and getattr(model, "speculative", False))
    pending: list[tuple[torch.Tensor, int | None]] = []
    while True:
        if cancel.is_set():
            reason = "cancelled"
            break
        draw = sampler.draw(logits)
        now = time.perf_counter()
        timer.first_token = timer.first_token or now
        timer.last_token = now
        new += 1
        if draw.token_id in stop_ids:
            yield StepEvent(draw.token_id, "", time.monotonic_ns(), draw.logprob, draw.entropy, steps=steps)
            reason = "eos"
            break
        text, hit = stops.feed(detok.push(draw.token_id))
        yield StepEvent(draw.token_id, text, time.monotonic_ns(), draw.logprob, draw.entropy, steps=steps)
        if hit:
            reason = "stop_string"
            break
        if new >= settings.max_new_tokens:
            break
        if len(prompt) + new >= context_limit:
            reason, detail = "context_full", f"the context holds {context_limit} tokens"
            break
        sampler.extend([draw.token_id])
        try:
            if speculate and not pending:
                ahead = model.speculate(state, draw.token_id)
                # The state absorbed the chosen token and every returned one but the last.
                fed.append(draw.token_id)
                fed.extend(tok for tok, _, _ in ahead[:-1])
                pending = [(lg, st) for _, lg, st in ahead]
            if pending:
                logits, steps = pending.pop(0)
                continue
            logits = model(torch.tensor([[draw.token_id]], device=device), state, last_only=True)[0, -1]
        except ContextFull as e:
            reason, detail = "context_full", str(e)
            break
        except Interrupted:
            # Stopped inside a forward (Huginn polls between recurrence steps): the token was sampled and
            # shown but not absorbed.
            reason = "cancelled"
            roll_back(state, fed)
            break
        fed.append(draw.token_id)
        steps = model.last_steps
    tail = ""
    if reason != "stop_string":
        tail, hit = stops.feed(detok.flush())
        tail += "" if hit else stops.flush()
    decode_s = (timer.last_token - timer.first_token) if timer.first_token and timer.last_token else 0.0
    n_prefill = len(prompt) - reused
    yield Done(
        stop_reason=reason, prompt_tokens=len(prompt), new_tokens=new,
        ttft_s=(timer.first_token - timer.start) if timer.first_token else 0.0,
        prefill_tok_s=n_prefill / timer.prefill_s if timer.prefill_s > 0 else 0.0,
        decode_tok_s=(new - 1) / decode_s if new > 1 and decode_s > 0 else 0.0,
        reused_tokens=reused, detail=detail, text=tail)

"""The per-token figures a `TokenDetail` asks for, and what asking for them costs.

`token_detail` turns one decode step's logits into the chosen token's log-probability, the entropy of the
model's raw distribution and the top alternatives, with one host round trip. The decode loop calls it
only when a figure is asked for, so a call that asks for none does no work here. `detail_cost` measures
decode tok/s with the figures off and on, for `smollchat bench` and the README's overhead line.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from ..contract import Done, SamplingSettings, TokenDetail
from .sample import Sampler

#: StepEvent's optional fields when nothing is asked for.
NO_DETAIL: dict[str, Any] = {"logprob": None, "entropy": None, "alternatives": None}


def token_detail(logits: torch.Tensor, token_id: int, want: TokenDetail, sampler: Sampler) -> dict[str, Any]:
    """StepEvent's optional fields for the token chosen from a [V] row of next-token logits.

    The sampler must not yet have taken the token into its history (`want.final` replays its
    penalties and filters on this row).
    """
    if not want.any:
        return dict(NO_DETAIL)
    x = logits.float()
    top = x.max()
    # One exp pass serves the log-probability, the entropy and the alternatives; -inf logits weigh 0
    # (clamped so that 0 * -inf never enters the entropy's dot product).
    shifted = (x - top).clamp_(min=-1e4)
    w = shifted.exp()
    total = w.sum()
    log_total = total.log()
    if want.final:
        dist = sampler.final_scores(logits).log_softmax(-1)
        chosen = dist[token_id]
    else:
        dist = None
        chosen = shifted[token_id] - log_total
    parts = [chosen.double().view(1)]
    if want.entropy:
        parts.append((log_total - torch.dot(w, shifted) / total).double().view(1))
    k = min(want.alternatives, x.shape[-1])
    if k:
        best = (dist if dist is not None else x).topk(k)
        values = best.values if dist is not None else best.values - top - log_total
        parts += [values.double(), best.indices.double()]
    values = torch.cat(parts).tolist()  # the one host round trip
    out = dict(NO_DETAIL)
    if want.logprob:
        out["logprob"] = values[0]
    if want.entropy:
        out["entropy"] = values[1]
    if k:
        lps, ids = values[-2 * k:-k], values[-k:]
        out["alternatives"] = tuple((int(i), lp) for i, lp in zip(ids, lps) if lp != float("-inf"))
    return out


def detail_cost(engine: Any, ids: list[int], new_tokens: int = 64, repeats: int = 3,
                detail: TokenDetail = TokenDetail(logprob=True, entropy=True, alternatives=5)) -> dict[str, float]:
    """Decode tok/s of `engine.generate` on `ids` with no per-token figures and with `detail`, greedy, the
    median of `repeats` alternating runs each; returns {"off_tok_s", "on_tok_s", "overhead"} (the
    fraction of decode speed that asking costs)."""
    settings = SamplingSettings(temperature=0.0, max_new_tokens=new_tokens, repetition_penalty=1.0)
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for on in (False, True):
            done = None
            for ev in engine.generate(list(ids), settings, detail=detail if on else TokenDetail()):
                done = ev if isinstance(ev, Done) else done
            if done is None or done.new_tokens < 2:
                raise ValueError("this prompt stops the reply before two tokens; measure on another prompt")
            rates[on].append(done.decode_tok_s)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    return {"off_tok_s": off, "on_tok_s": on, "overhead": 1.0 - on / off if off > 0 else 0.0}

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
    raw = logits.float().log_softmax(-1)
    dist = sampler.final_scores(logits).log_softmax(-1) if want.final else raw
    parts = [dist[token_id].double().view(1)]
    if want.entropy:
        p = raw.exp()
        # -inf logits weigh 0: mask them instead of multiplying 0 by -inf.
        parts.append(-(p * raw.masked_fill(p == 0, 0.0)).sum().double().view(1))
    k = min(want.alternatives, dist.shape[-1])
    if k:
        top = dist.topk(k)
        parts += [top.values.double(), top.indices.double()]
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

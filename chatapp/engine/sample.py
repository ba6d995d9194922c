"""Logit processors and sampling, on the logits' device.

Order and semantics follow HF transformers (the Axiom card's pipeline, spec §7): repetition penalty
over every distinct id seen so far (prompt included) -> no-repeat n-gram ban -> temperature ->
top-k (ties kept) -> top-p (keep an id iff the mass of strictly higher-ranked ids is < p) -> min-p
-> sample. Temperature 0 is greedy: argmax after the penalties. The repetition penalty keeps its
"seen" set as a device mask, so a step costs no host round trip beyond the one token id the
caller needs anyway for streaming.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import SamplingSettings


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive scores of seen ids by the penalty, multiply negative ones (HF rule)."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
    return torch.where(seen, penalised, scores)


def banned_ngram_tokens(history: list[int], n: int, table: dict[tuple[int, ...], set[int]] | None = None) -> set[int]:
    """Ids that would complete an n-gram already present in history (fairseq/HF rule)."""
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    key = tuple(history[len(history) - (n - 1):])
    if table is not None:
        return table.get(key, set())
    return {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == key}


def apply_temperature_top_k_top_p_min_p(scores: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """Warp scores ([..., V]) for sampling; removed ids become -inf."""
    scores = scores / s.temperature
    neg = float("-inf")
    if s.top_k and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, neg)
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        remove_sorted = mass_before >= s.top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, neg)
    if s.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, neg)
    return scores


@dataclass
class Draw:
    token_id: int
    logprob: float
    entropy: float


class Sampler:
    """Per-generation sampler state: seen-id mask, n-gram table, RNG."""

    def __init__(self, settings: SamplingSettings, vocab_size: int, device: torch.device | str,
                 history: list[int]) -> None:
        settings.validate()
        self.s = settings
        self.device = torch.device(device)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.history: list[int] = []
        self._ngrams: dict[tuple[int, ...], set[int]] = {}
        self.generator = torch.Generator(device=self.device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()
        self.extend(history)

    def extend(self, ids: list[int]) -> None:
        """Record ids (prompt or accepted tokens) for the penalties."""
        if not ids:
            return
        valid = [i for i in ids if 0 <= i < self.seen.numel()]
        if self.s.repetition_penalty != 1.0 and valid:
            self.seen[torch.tensor(valid, device=self.device)] = True
        n = self.s.no_repeat_ngram
        for tok in ids:
            self.history.append(tok)
            if n >= 2 and len(self.history) >= n:
                gram = self.history[-n:]
                self._ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties (repetition, no-repeat n-gram) on a [V] fp32 row."""
        scores = apply_repetition_penalty(logits.float(), self.seen, self.s.repetition_penalty)
        banned = banned_ngram_tokens(self.history, self.s.no_repeat_ngram, self._ngrams)
        if banned:
            idx = torch.tensor(sorted(banned), device=scores.device)
            scores = scores.index_fill(-1, idx, float("-inf"))
        return scores

    def draw(self, logits: torch.Tensor) -> Draw:
        """Choose the next token from a [V] row; returns it with its logprob and the raw entropy."""
        raw = logits.float()
        logp_raw = raw.log_softmax(-1)
        entropy = -(logp_raw.exp() * logp_raw).nan_to_num().sum()
        scores = self.process(raw)
        if self.s.temperature == 0:
            tok = scores.argmax()
            logprob = scores.log_softmax(-1)[tok]
        else:
            warped = apply_temperature_top_k_top_p_min_p(scores, self.s)
            logq = warped.log_softmax(-1)
            # Exponential race = multinomial sampling without a host-side cumulative sum.
            u = torch.empty_like(logq).exponential_(generator=self.generator)
            tok = (logq - u.log()).argmax()
            logprob = logq[tok]
        # One host round trip per token: the id (needed to stream text), logprob and entropy together.
        t, lp, ent = torch.stack([tok.float(), logprob, entropy]).tolist()
        return Draw(int(t), lp, ent)

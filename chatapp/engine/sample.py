"""Logit processors and sampling, on the logits' device, without sorting the vocabulary.

Order and semantics follow HF transformers (the Axiom card's pipeline, spec §7): repetition penalty
over every distinct id seen so far (prompt included) -> no-repeat n-gram ban -> temperature ->
top-k (ties kept) -> top-p (keep an id iff the mass of strictly higher-ranked ids is < p) -> min-p
-> sample. Temperature 0 is greedy: argmax after the penalties.

A full sort of a 100k vocabulary costs ~20 ms on one CPU core, so the filters run on a bounded
candidate set taken with `torch.topk` and say whether that set provably holds every id the filters
keep; when it does not (a top-k tie running past the candidates, or a top-p that needs more mass than
they carry, as on flat random-weight distributions) the step is redone exactly on the whole
vocabulary, top-p then cutting by probability buckets and sorting only the bucket where the mass
crosses p. That answer travels with the sampled id, so a step still costs one host round trip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import SamplingSettings

#: Candidates taken for top-p / min-p without top-k (topk of 256 of 100k ids: ~0.3 ms on one core).
CANDIDATES = 256
#: Top-k takes this many extra candidates (at least) so that ties at the k-th score stay on the fast path.
TIE_MARGIN = 16
#: Probability buckets of the exact top-p: 1/32-logit wide, 128 logits deep (the rest share the last).
_BUCKETS, _PER_LOGIT = 4096, 32.0
_NEG = float("-inf")


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


def filter_candidates(scores: torch.Tensor, s: SamplingSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Temperature, top-k, top-p and min-p on the top-scoring ids of a [V] row of (penalised) scores.

    Returns (ids [C] by descending score, warped logits [C] with -inf for removed ids, exact: a 0-d bool
    tensor, true when no id outside the C candidates would survive the filters), or None when no filter
    is set and every id stays (sample the whole row).
    """
    v_size = scores.shape[-1]
    k = s.top_k if 0 < s.top_k < v_size else 0
    if not k and s.top_p >= 1.0 and s.min_p <= 0.0:
        return None
    c = min(v_size, k + max(k, TIE_MARGIN) if k else CANDIDATES)
    vals, ids = torch.topk(scores, c)
    z = vals / s.temperature
    true = torch.ones((), dtype=torch.bool, device=scores.device)
    if k:
        kth = vals[k - 1]
        z = z.masked_fill(vals < kth, _NEG)
        # The top-k set lies inside the candidates unless a tie at the k-th score runs past them.
        exact = vals[-1] < kth if c < v_size else true
        lse = z.logsumexp(0)
    else:
        # The last candidate removed => every later id is too (top-p and min-p remove by rank/value).
        exact = None
        lse = (scores / s.temperature).logsumexp(0) if s.top_p < 1.0 else None
    if s.top_p < 1.0:
        probs = (z - lse).exp()
        mass_before = probs.cumsum(0) - probs
        cut = mass_before >= s.top_p
        cut[0] = False
        z = z.masked_fill(cut, _NEG)
    if s.min_p > 0.0:
        # p_i < min_p * p_max  <=>  exp(z_i - z_max) < min_p: the normaliser cancels.
        z = z.masked_fill((z - z[0]).exp() < s.min_p, _NEG)
    if exact is None:
        exact = torch.isinf(z[-1]) if c < v_size else true
    return ids, z, exact


def filter_dense(scores: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """The same filters on the whole [V] row (the exact fallback): warped logits, -inf where removed."""
    z = scores / s.temperature
    if 0 < s.top_k < scores.shape[-1]:
        z = z.masked_fill(scores < torch.topk(scores, s.top_k).values[-1], _NEG)
    if s.top_p < 1.0:
        z = z.masked_fill(~_top_p_keep(z, s.top_p), _NEG)
    if s.min_p > 0.0:
        z = z.masked_fill((z - z.max()).exp() < s.min_p, _NEG)
    return z


def _top_p_keep(z: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p mask of a [V] logit row in O(V): bucket ids by logit below the max, find the bucket
    where the mass from the top reaches p, and sort only that bucket's ids."""
    top = z.max()
    probs = (z - top).exp()
    probs = probs / probs.sum()
    bucket = ((top - z) * _PER_LOGIT).clamp_(max=_BUCKETS - 1).long()
    mass = torch.zeros(_BUCKETS, dtype=torch.float64, device=z.device).index_add_(0, bucket, probs.double())
    through = mass.cumsum(0)
    j = int((through < p).sum())  # the first bucket whose mass reaches p (a sync, on this rare path only)
    keep = bucket < j
    if j < _BUCKETS:
        members = (bucket == j).nonzero().squeeze(1)
        pv, order = probs[members].double().sort(descending=True)
        before = through[j] - mass[j] + pv.cumsum(0) - pv
        keep[members[order[before < p]]] = True
    return keep


def _pick(z: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample an index of a [N] logit row (-inf never chosen) by inverting the cumulative mass with one
    uniform draw; returns (index, its log-probability), both 0-d tensors on the row's device."""
    top = z.max()
    w = (z - top).exp()
    cum = w.cumsum(0, dtype=torch.float64)
    total = cum[-1]
    u = torch.rand((), generator=generator, device=z.device, dtype=torch.float64)
    # Strictly below the total, so the first cum above it belongs to an id with positive mass.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    i = torch.searchsorted(cum, x.view(1), right=True)[0]
    return i, (z[i] - top).double() - total.log()


def _entropy(raw: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(raw); ids with -inf logits add nothing."""
    if raw.numel() <= 4096:
        # Three ops: on a small vocabulary each op's dispatch is most of the cost.
        return torch.special.entr(raw.softmax(0)).sum()
    # entr's per-element log is ~3x slower than this on 100k ids (one exp pass, a dot).
    top = raw.max()
    shifted = (raw - top).clamp_(min=-1e4)  # -inf weighs 0 without 0 * inf in the dot
    w = shifted.exp()
    total = w.sum()
    return total.log() - torch.dot(w, shifted) / total


@dataclass
class Draw:
    token_id: int
    #: Log-probability under the final sampling distribution; None when not asked for.
    logprob: float | None
    #: Entropy (nats) of the raw row; None when not asked for.
    entropy: float | None


class Sampler:
    """Per-generation sampler state: history (host list and device ids for the penalty), n-gram table, RNG."""

    def __init__(self, settings: SamplingSettings, vocab_size: int, device: torch.device | str,
                 history: list[int]) -> None:
        settings.validate()
        self.s = settings
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.history: list[int] = []
        self._ngrams: dict[tuple[int, ...], set[int]] = {}
        # Ids seen so far, for the repetition penalty; repeats are harmless (the same value is written twice).
        self._seen = torch.empty(max(64, 2 * len(history)), dtype=torch.long, device=self.device)
        self._n_seen = 0
        self._synced = 0  # how much of history is in _seen
        self.generator = torch.Generator(device=self.device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()
        self.extend(history)

    def extend(self, ids: list[int]) -> None:
        """Record ids (prompt or accepted tokens) for the penalties; the device copy follows lazily."""
        n = self.s.no_repeat_ngram
        for tok in ids:
            self.history.append(tok)
            if n >= 2 and len(self.history) >= n:
                gram = self.history[-n:]
                self._ngrams.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def _seen_ids(self) -> torch.Tensor:
        new = [i for i in self.history[self._synced:] if 0 <= i < self.vocab_size]
        self._synced = len(self.history)
        if new:
            end = self._n_seen + len(new)
            if end > self._seen.numel():
                grown = torch.empty(2 * end, dtype=torch.long, device=self.device)
                grown[:self._n_seen] = self._seen[:self._n_seen]
                self._seen = grown
            self._seen[self._n_seen:end] = torch.tensor(new).to(self.device, non_blocking=True)
            self._n_seen = end
        return self._seen[:self._n_seen]

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties (repetition, no-repeat n-gram) on a [V] row; returns fp32 scores (never the input
        tensor modified: a changed row is a copy)."""
        scores = logits.float()
        if self.s.repetition_penalty != 1.0:
            seen = self._seen_ids()
            if seen.numel():
                got = scores[seen]
                pen = self.s.repetition_penalty
                scores = scores.index_put((seen,), torch.where(got > 0, got / pen, got * pen))
        banned = banned_ngram_tokens(self.history, self.s.no_repeat_ngram, self._ngrams)
        if banned:
            idx = torch.tensor(sorted(banned)).to(scores.device, non_blocking=True)
            scores = scores.index_fill(-1, idx, _NEG)
        return scores

    def final_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The [V] logits of the distribution `draw` samples this step from (call it before `extend`):
        penalised, then warped by the filters (-inf where removed); under greedy the penalised scores."""
        scores = self.process(logits)
        return scores if self.s.temperature == 0 else filter_dense(scores, self.s)

    def draw(self, logits: torch.Tensor, logprob: bool = True, entropy: bool = True) -> Draw:
        """Choose the next token from a [V] row; with it its logprob and the raw row's entropy, each
        computed only when asked for (a full pass over the vocabulary apiece)."""
        raw = logits.float()
        ent = _entropy(raw) if entropy else None
        scores = self.process(raw)
        if self.s.temperature == 0:
            tok = scores.argmax()
            return self._sync(tok, scores[tok] - scores.logsumexp(0) if logprob else None, ent)
        cand = filter_candidates(scores, self.s)
        if cand is not None:
            ids, z, exact = cand
            i, lp = _pick(z, self.generator)
            d = self._sync(ids[i], lp if logprob else None, ent, exact)
            if d is not None:
                return d
        tok, lp = _pick(filter_dense(scores, self.s), self.generator)
        return self._sync(tok, lp if logprob else None, ent)

    @staticmethod
    def _sync(tok: torch.Tensor, logprob: torch.Tensor | None, entropy: torch.Tensor | None,
              ok: torch.Tensor | None = None) -> Draw | None:
        # The one host round trip of a step: the id (needed to stream text), the figures asked for and, on
        # the candidate path, whether the candidates were enough (else None: redo on the whole row).
        parts = [t for t in (tok, logprob, entropy, ok) if t is not None]
        out = iter(torch.stack([t.double() for t in parts]).tolist())
        token_id = int(next(out))
        lp = next(out) if logprob is not None else None
        ent = next(out) if entropy is not None else None
        if ok is not None and not next(out):
            return None
        return Draw(token_id, lp, ent)

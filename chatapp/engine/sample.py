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
crosses p. The candidates (top-k + 16, or 256) cross to the host in one transfer, the step's one round
trip, and are filtered and sampled there with numpy (float32, as HF's warpers): on a few dozen numbers each
tensor op's dispatch costs more than its arithmetic, so a step on the candidate path is the penalty
scatter, one topk and a dozen numpy calls. The uniform comes from the sampler's seeded generator, so a seed
replays a reply.

A draw returns the token id alone: the chosen token's log-probability, the raw row's entropy and the
alternatives are computed by engine/token_detail.py, only when a TokenDetail asks for them.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..contract import SamplingSettings

#: Candidates taken for top-p / min-p without top-k (topk of 256 of 100k ids: ~0.3 ms on one core).
CANDIDATES = 256
#: Top-k takes this many extra candidates so that ties at the k-th score stay on the candidate path.
TIE_MARGIN = 16
#: Rows up to this long go to the host whole instead of through topk (the demo vocabularies are ~260 ids).
_HOST_ROW = 4096
#: Ids per block of the CPU candidate search (`top_candidates`): a 100k row has ~1,600 blocks.
_BLOCK = 64
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


@functools.lru_cache(maxsize=4)
def _arange(n: int) -> torch.Tensor:
    return torch.arange(n)


def top_candidates(scores: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(scores, c)` of a [V] row: the same values, descending (ids of equal values may come in
    another order). On CPU, for a row much longer than c, through block maxima: torch.topk first copies the
    whole row into (value, id) pairs (1.6 MB for 100k ids, which a busy machine's caches make slow), while
    the maxima of 64-id blocks take one vectorised read. Every id among the c largest values lies in one of
    the c blocks with the largest maxima (the c-th largest block maximum is at most the c-th largest value),
    so the top c of those blocks plus the row's tail past the last whole block are the top c of the row."""
    n = scores.shape[0]
    nb = n // _BLOCK
    if scores.device.type != "cpu" or nb < 8 * c:
        return torch.topk(scores, c)
    cut = nb * _BLOCK
    body = scores[:cut].view(nb, _BLOCK)
    rows = torch.topk(body.amax(1), c, sorted=False).indices
    vals, j = torch.topk(torch.cat((body.index_select(0, rows).view(-1), scores[cut:])), c)
    # The same gather on the ids themselves maps a position among the candidates back to its id.
    ids = _arange(n)
    return vals, torch.cat((ids[:cut].view(nb, _BLOCK).index_select(0, rows).view(-1), ids[cut:]))[j]


def filter_candidates(scores: torch.Tensor, s: SamplingSettings) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """Temperature, top-k, top-p and min-p on the top-scoring ids of a [V] row of (penalised) scores.

    Returns (ids [C] by descending score, their warped logits [C] (float32) with -inf for removed ids, exact:
    true when no id outside the candidates would survive the filters), or None when no filter is set and
    every id stays (sample the whole row). The candidates cross to the host in one transfer (the step's one
    round trip) and are filtered there with numpy in the float32 arithmetic of HF's warpers (a torch CPU
    cumsum accumulates in float64, so this one does too): on a few dozen numbers each tensor op's dispatch
    would cost more than its arithmetic.
    """
    v_size = scores.shape[-1]
    k = s.top_k if 0 < s.top_k < v_size else 0
    if not k and s.top_p >= 1.0 and s.min_p <= 0.0:
        return None
    c = min(v_size, k + TIE_MARGIN if k else CANDIDATES)
    # Top-p without top-k measures mass against the whole row's normaliser.
    whole_lse = not k and s.top_p < 1.0
    if v_size <= _HOST_ROW:
        # A short row crosses whole and is ordered there (a sort of a few hundred floats is microseconds):
        # every id is a candidate, so the answer is always exact.
        c = v_size
        row = scores.cpu().numpy()
        ids = np.argsort(-row, kind="stable")
        vals = row[ids]
        if whole_lse:
            zr = row / np.float32(s.temperature)
            top = zr.max()
            lse = top + np.log(np.exp(zr - top).sum(dtype=np.float32))
    else:
        vals_t, ids_t = top_candidates(scores, c)
        parts = [vals_t.double(), ids_t.double()]
        if whole_lse:
            parts.append((scores / s.temperature).logsumexp(0).double().view(1))
        host = torch.cat(parts).cpu().numpy()
        vals, ids = host[:c].astype(np.float32), host[c:2 * c].astype(np.int64)
        if whole_lse:
            lse = np.float32(host[-1])
    z = vals / np.float32(s.temperature)
    if k:
        kth = vals[k - 1]
        z[vals < kth] = _NEG
        # The top-k set lies inside the candidates unless a tie at the k-th score runs past them.
        exact = c >= v_size or bool(vals[-1] < kth)
        top = z.max()
        lse = top + np.log(np.exp(z - top).sum(dtype=np.float32))
    else:
        exact = None
    if s.top_p < 1.0:
        # Keep an id iff the mass of the ids ranked above it is < p (the first always stays).
        probs = np.exp(z - lse)
        cut = np.cumsum(probs, dtype=np.float64).astype(np.float32) - probs >= np.float32(s.top_p)
        cut[0] = False
        z[cut] = _NEG
    if s.min_p > 0.0:
        # p_i < min_p * p_max  <=>  exp(z_i - z_max) < min_p: the normaliser cancels.
        z[np.exp(z - z[0]) < np.float32(s.min_p)] = _NEG
    if exact is None:
        # The last candidate removed => every later id is too (top-p and min-p remove by rank/value).
        exact = c >= v_size or bool(np.isinf(z[-1]))
    return ids, z, exact


def pick_host(z: np.ndarray, u: float) -> int:
    """The index that a uniform draw u in [0, 1) selects from a logit array (-inf never chosen): the
    inverse of the cumulative mass, as `_pick` does on a device row."""
    cum = np.cumsum(np.exp(z - z.max()), dtype=np.float64)
    total = cum[-1]
    # Strictly below the total, so the first cum above it belongs to an id with positive mass.
    return int(np.searchsorted(cum, min(u * total, math.nextafter(total, 0.0)), side="right"))


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


def _pick(z: torch.Tensor, generator: torch.Generator) -> int:
    """Sample an index of a [N] logit row (-inf never chosen) by inverting the cumulative mass with one
    uniform draw (the whole-row path: no filter, or the exact fallback)."""
    top = z.max()
    cum = (z - top).exp().cumsum(0, dtype=torch.float64)
    total = cum[-1]
    u = torch.rand((), generator=generator, device=z.device, dtype=torch.float64)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return int(torch.searchsorted(cum, x.view(1), right=True)[0])


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
        # The distinct ids seen so far, for the repetition penalty: a host array (a CPU row reads it without a
        # copy) and, on another device, its copy there, both appended as tokens come.
        self._seen_set: set[int] = set()
        self._seen = np.empty(max(64, 2 * len(history)), dtype=np.int64)
        self._seen_device = None if self.device.type == "cpu" else torch.empty(0, dtype=torch.long, device=self.device)
        self._n_seen = 0
        self._synced = 0  # how much of history is in _seen
        self.generator = torch.Generator(device=self.device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()
        # The candidate path draws its uniform on the host: the same generator on CPU, a host twin elsewhere.
        self._host_generator = self.generator
        if self.device.type != "cpu":
            self._host_generator = torch.Generator().manual_seed(self.generator.initial_seed())
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
        fresh = [i for i in self.history[self._synced:] if 0 <= i < self.vocab_size and i not in self._seen_set]
        self._synced = len(self.history)
        if fresh:
            fresh = list(dict.fromkeys(fresh))
            self._seen_set.update(fresh)
            end = self._n_seen + len(fresh)
            if end > self._seen.shape[0]:
                grown = np.empty(2 * end, dtype=np.int64)
                grown[:self._n_seen] = self._seen[:self._n_seen]
                self._seen = grown
            self._seen[self._n_seen:end] = fresh
            if self._seen_device is not None:
                new = torch.from_numpy(self._seen[self._n_seen:end]).to(self.device, non_blocking=True)
                self._seen_device = torch.cat((self._seen_device, new))
            self._n_seen = end
        if self._seen_device is not None:
            return self._seen_device
        return torch.from_numpy(self._seen[:self._n_seen])

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties (repetition, no-repeat n-gram) on a [V] row; returns fp32 scores (never the input
        tensor modified: a changed row is a copy)."""
        scores = logits.float()
        if scores.data_ptr() == logits.data_ptr():
            scores = scores.clone()
        self._penalise(scores, None)
        return scores

    def _penalise(self, scores: torch.Tensor, undo: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """The penalties, in place on fp32 `scores`; with `undo`, each overwritten (ids, values) is kept so that
        `_restore` can put the caller's row back (two small scatters instead of a copy of the whole row)."""
        if self.s.repetition_penalty != 1.0:
            seen = self._seen_ids()
            if seen.numel():
                got = scores[seen]
                if undo is not None:
                    undo.append((seen, got))
                pen = self.s.repetition_penalty
                scores.index_put_((seen,), torch.where(got > 0, got / pen, got * pen))
        banned = banned_ngram_tokens(self.history, self.s.no_repeat_ngram, self._ngrams)
        if banned:
            idx = torch.tensor(sorted(banned)).to(scores.device, non_blocking=True)
            if undo is not None:
                undo.append((idx, scores[idx]))
            scores.index_fill_(-1, idx, _NEG)

    @staticmethod
    def _restore(scores: torch.Tensor, undo: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for ids, values in reversed(undo):
            scores.index_put_((ids,), values)

    def final_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The [V] logits of the distribution `draw` samples this step from (call it before `extend`):
        penalised, then warped by the filters (-inf where removed); under greedy the penalised scores."""
        scores = self.process(logits)
        return scores if self.s.temperature == 0 else filter_dense(scores, self.s)

    def draw(self, logits: torch.Tensor) -> int:
        """Choose the next token id from a [V] row (one host round trip). Its log-probability, the row's
        entropy and the alternatives, when asked for, are engine/token_detail.py's. An fp32 row is penalised
        in place and put back before this returns."""
        scores = logits.float()
        undo: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if scores.data_ptr() == logits.data_ptr():
            # In place only where that is allowed (autograd, or an inference tensor outside inference mode: copy).
            if logits.requires_grad or (logits.is_inference() and not torch.is_inference_mode_enabled()):
                scores = scores.clone()
            else:
                undo = []
        try:
            self._penalise(scores, undo)
            return self._choose(scores)
        finally:
            if undo:
                self._restore(scores, undo)

    def _choose(self, scores: torch.Tensor) -> int:
        if self.s.temperature == 0:
            return int(scores.argmax())
        cand = filter_candidates(scores, self.s)
        if cand is not None:
            ids, z, exact = cand
            if exact:
                u = float(torch.rand((), generator=self._host_generator, dtype=torch.float64))
                return int(ids[pick_host(z, u)])
            return _pick(filter_dense(scores, self.s), self.generator)
        return _pick(scores / self.s.temperature, self.generator)

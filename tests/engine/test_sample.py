"""Every sampler setting against the Axiom fixture's sampler tensors and a naive full-sort oracle."""
import math

import pytest
import torch
from safetensors.torch import load_file

from chatapp.engine import sample
from chatapp.contract import SamplingSettings, TokenDetail
from chatapp.engine.token_detail import token_detail
from chatapp.engine.sample import Sampler, banned_ngram_tokens, filter_candidates, filter_dense

CARD = SamplingSettings(temperature=0.2, top_k=50, top_p=0.85, repetition_penalty=1.15, no_repeat_ngram=3)
NEG = float("-inf")
#: The draw's figures, from token_detail: log-probability under the sampled distribution, raw entropy.
FINAL = TokenDetail(logprob=True, entropy=True, final=True)


def naive_warp(scores: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """The oracle: HF's warpers over a full sort of the vocabulary (the sampler before the partial selection)."""
    scores = scores / s.temperature
    if s.top_k and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, NEG)
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        remove_sorted = mass_before >= s.top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, NEG)
    if s.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, NEG)
    return scores


def naive_penalties(logits, history, s: SamplingSettings):
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
    seen[torch.tensor(history, dtype=torch.long)] = True
    pen = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
    scores = torch.where(seen, pen, logits) if s.repetition_penalty != 1.0 else logits
    banned = _naive_ngram(history, s.no_repeat_ngram) if s.no_repeat_ngram else set()
    return scores.index_fill(-1, torch.tensor(sorted(banned), dtype=torch.long), NEG) if banned else scores


def warp(scores, s):
    """What the sampler samples from, as a dense row: the candidate path, or the exact fallback it takes."""
    cand = filter_candidates(scores, s)
    if cand is None:
        return scores / s.temperature
    ids, z, exact = cand
    if not exact:
        return filter_dense(scores, s)
    return torch.full_like(scores, NEG).scatter(0, torch.from_numpy(ids), torch.from_numpy(z))


@pytest.fixture(scope="module")
def golden(fixtures_root):
    return load_file(str(fixtures_root / "axiom" / "golden.safetensors"))


def _same_scores(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = ~torch.isinf(a)
    assert torch.allclose(a[fin], b[fin], atol=1e-6, rtol=1e-6)


def test_penalties_match_hf_processors(golden):
    s = Sampler(CARD, 512, "cpu", golden["sampler_history_ids"][0].tolist())
    _same_scores(s.process(golden["sampler_logits"][0]), golden["sampler_after_rep_penalty_and_ngram"][0])


@pytest.mark.parametrize("fallback", [False, True])
def test_warpers_match_hf_final_scores(golden, fallback):
    scores = golden["sampler_after_rep_penalty_and_ngram"][0]
    _same_scores(filter_dense(scores, CARD) if fallback else warp(scores, CARD), golden["sampler_hf_final_scores"][0])


def test_authors_sampler_is_the_no_top_k_case(golden):
    w = warp(golden["sampler_after_rep_penalty_and_ngram"][0], SamplingSettings(temperature=0.2, top_p=0.85))
    assert torch.allclose(w.softmax(-1), golden["sampler_authors_final_probs"][0], atol=1e-6)


def _cases():
    """Peaked and flat rows, bf16-rounded rows full of ties, every filter alone and together."""
    settings = [dict(top_k=50), dict(top_k=7), dict(top_p=0.9), dict(top_p=0.3), dict(min_p=0.05),
                dict(min_p=0.002), dict(top_k=50, top_p=0.85), dict(top_k=40, top_p=0.95, min_p=0.01),
                dict(top_p=0.99, min_p=0.001)]
    rows = [("peaked", 4.0, torch.float32), ("flat", 0.3, torch.float32), ("ties", 2.0, torch.bfloat16)]
    return [(name, scale, dt, kw) for name, scale, dt in rows for kw in settings]


@pytest.mark.parametrize("n", [5000, 300])  # the topk path of a long row; a short row sorted on the host
@pytest.mark.parametrize("name,scale,dt,kw", _cases(), ids=lambda v: str(v))
def test_partial_selection_keeps_the_oracles_set_and_scores(name, scale, dt, kw, n):
    g = torch.Generator().manual_seed(len(str(kw)) + int(scale * 10))
    for trial in range(3):
        scores = (torch.randn(n, generator=g) * scale).to(dt).float()
        scores[torch.randint(0, n, (20,), generator=g)] = NEG  # banned ids
        s = SamplingSettings(temperature=0.7, **kw)
        # Which of several ids tied at a top-p cut survives follows the sort's order of ties, arbitrary in the
        # oracle too: with ties, the kept scores are compared as a multiset.
        same = (lambda a, b: _same_scores(a.sort().values, b.sort().values)) if name == "ties" else _same_scores
        same(warp(scores, s), naive_warp(scores, s))
        same(filter_dense(scores, s), naive_warp(scores, s))


def test_flat_rows_take_the_exact_fallback_and_ties_past_the_margin_too():
    flat = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 0.1
    assert not filter_candidates(flat, SamplingSettings(temperature=1.0, top_p=0.9))[2]
    tied = torch.zeros(5000)
    tied[:3] = 1.0
    s = SamplingSettings(temperature=1.0, top_k=5)
    assert not filter_candidates(tied, s)[2]
    _same_scores(warp(tied, s), naive_warp(tied, s))  # all 4,997 tied ids at the 5th score are kept
    assert torch.isfinite(warp(tied, s)).all()


def test_the_card_settings_never_sort_the_vocabulary(monkeypatch):
    sizes = []
    real = torch.Tensor.sort

    def spy(self, *a, **kw):
        sizes.append(self.numel())
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "sort", spy)
    monkeypatch.setattr(torch, "sort", lambda t, *a, **kw: spy(t, *a, **kw))
    g = torch.Generator().manual_seed(1)
    for s in (CARD, SamplingSettings(temperature=1.0, top_p=0.9, seed=0)):
        sampler = Sampler(s, 100_277, "cpu", torch.randint(0, 100_277, (300,), generator=g).tolist())
        for scale in (5.0, 0.2):  # peaked (candidates) and flat (the fallback buckets)
            sampler.extend([sampler.draw(torch.randn(100_277, generator=g) * scale)])
    assert max(sizes, default=0) < 10_000


def _naive_ngram(history, n):
    if len(history) < n - 1:
        return set()
    tail = history[len(history) - n + 1:]
    return {history[i + n - 1] for i in range(len(history) - n + 1) if history[i:i + n - 1] == tail}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_table_matches_naive_scan(n):
    g = torch.Generator().manual_seed(n)
    history = torch.randint(0, 5, (60,), generator=g).tolist()
    s = Sampler(SamplingSettings(temperature=0, no_repeat_ngram=n), 5, "cpu", history[:10])
    for tok in history[10:]:
        assert banned_ngram_tokens(s.history, n, s._ngrams if n >= 2 else None) == _naive_ngram(s.history, n)
        s.extend([tok])


def test_penalties_over_a_growing_history_match_the_dense_rule():
    g = torch.Generator().manual_seed(3)
    s = SamplingSettings(temperature=0, repetition_penalty=1.3, no_repeat_ngram=2)
    history = torch.randint(0, 300, (100,), generator=g).tolist()
    sampler = Sampler(s, 300, "cpu", history[:5] + [300, -1])  # ids outside the vocabulary are ignored
    fed = history[:5] + [300, -1]
    for tok in history[5:]:
        logits = torch.randn(300, generator=g) * 3
        before = logits.clone()
        got = sampler.process(logits)
        assert torch.equal(logits, before)  # the caller's row is never modified
        assert torch.equal(got, naive_penalties(logits, [i for i in fed if 0 <= i < 300], s))
        assert sampler.draw(logits) == int(naive_penalties(logits, [i for i in fed if 0 <= i < 300], s).argmax())
        sampler.extend([tok])
        fed.append(tok)


def test_repetition_penalty_rule():
    logits = torch.tensor([2.0, -2.0, 0.0, 1.0])
    s = Sampler(SamplingSettings(temperature=0, repetition_penalty=2.0), 4, "cpu", [0, 1, 2])
    assert s.process(logits).tolist() == [1.0, -4.0, 0.0, 1.0]


def test_top_k_keeps_ties_and_top_p_min_p():
    scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    out = warp(scores, SamplingSettings(temperature=1.0, top_k=2))
    assert torch.isinf(out).tolist() == [False, False, False, True, True]
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    out = warp(p, SamplingSettings(temperature=1.0, top_p=0.8))
    # Keep an id iff the mass strictly before it is < p: 0 and 0.5 are < 0.8, 0.8 is not.
    assert torch.isinf(out).tolist() == [False, False, True, True]
    out = warp(p, SamplingSettings(temperature=1.0, min_p=0.25))
    assert torch.isinf(out).tolist() == [False, False, False, True]  # 0.05 < 0.25 x 0.5


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([5.0, 4.9, 0.0])
    s = Sampler(SamplingSettings(temperature=0, repetition_penalty=1.1), 3, "cpu", [0])
    tok = s.draw(logits)
    assert tok == 1
    d = token_detail(logits, tok, FINAL, s)
    assert math.isclose(d["entropy"], float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum()), rel_tol=1e-5)
    assert math.isclose(d["logprob"], float(s.process(logits).log_softmax(-1)[1]), rel_tol=1e-5)


def test_entropy_ignores_minus_infinity_logits():
    logits = torch.tensor([1.0, NEG, 0.5, NEG])
    s = Sampler(SamplingSettings(temperature=0), 4, "cpu", [])
    d = token_detail(logits, s.draw(logits), FINAL, s)
    p = torch.tensor([1.0, 0.5]).softmax(-1)
    assert math.isclose(d["entropy"], float(-(p * p.log()).sum()), rel_tol=1e-5)


def test_seeded_sampling_reproduces_and_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    settings = SamplingSettings(temperature=1.0, seed=123)
    draws = [Sampler(settings, 4, "cpu", []).draw(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(settings, 4, "cpu", [])
    counts = torch.bincount(torch.tensor([s.draw(logits) for _ in range(2000)]), minlength=4).float()
    assert torch.allclose(counts / 2000, logits.softmax(-1), atol=0.04)
    tok = s.draw(logits)
    assert math.isclose(token_detail(logits, tok, FINAL, s)["logprob"], float(logits.log_softmax(-1)[tok]), rel_tol=1e-5)


# 3 candidates: top-p needs more mass -> the exact fallback. host_row 0: the topk path a long row takes;
# otherwise this 12-id row crosses to the host whole (always exact).
@pytest.mark.parametrize("candidates,host_row", [(sample.CANDIDATES, 0), (3, 0), (3, sample._HOST_ROW)])
def test_filtered_sampling_follows_the_oracles_distribution(monkeypatch, candidates, host_row):
    monkeypatch.setattr(sample, "CANDIDATES", candidates)
    monkeypatch.setattr(sample, "_HOST_ROW", host_row)
    logits = torch.randn(12, generator=torch.Generator().manual_seed(5)) * 1.5
    settings = SamplingSettings(temperature=0.8, top_p=0.9, min_p=0.02, seed=7)
    want = naive_warp(logits, settings).softmax(-1)
    assert 2 < int((want > 0).sum()) < 12  # both filters bite
    assert bool(filter_candidates(logits, settings)[2]) == (candidates > 12 or host_row > 0)
    s = Sampler(settings, 12, "cpu", [])
    # Frequencies on the candidate path; the fallback shares _pick, so it is checked on fewer draws.
    n = 2500 if candidates > 12 or host_row else 300
    draws = [s.draw(logits) for _ in range(n)]
    freq = torch.bincount(torch.tensor(draws), minlength=12).float() / n
    # 4.5 standard errors of a binomial frequency per id; ids the oracle removes are never drawn.
    assert (freq[want == 0] == 0).all()
    assert ((freq - want).abs() <= 4.5 * (want * (1 - want) / n).sqrt() + 1e-3).all()
    # The figure token_detail reports for a drawn id is its log-probability under that distribution.
    for tok in draws[:50]:
        lp = token_detail(logits, tok, FINAL, s)["logprob"]
        assert math.isclose(lp, float(want[tok].log()), rel_tol=1e-4, abs_tol=1e-5)


def test_filtered_tokens_are_never_sampled():
    logits = torch.tensor([0.0, 0.1, 0.2, 5.0])
    s = Sampler(SamplingSettings(temperature=2.0, top_k=2, seed=0), 4, "cpu", [])
    assert {s.draw(logits) for _ in range(300)} <= {2, 3}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(repetition_penalty=0), dict(max_new_tokens=0), dict(top_k=-1)])
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingSettings(**bad).validate()


@pytest.mark.parametrize("v", [300, 20_000])
def test_entropy_matches_the_definition_on_small_and_large_vocabularies(v):
    logits = torch.randn(v, generator=torch.Generator().manual_seed(v)) * 3
    logits[::7] = NEG
    p = logits.softmax(-1)
    want = float(-(p[p > 0] * p[p > 0].log()).sum())
    s = Sampler(SamplingSettings(temperature=0), v, "cpu", [])
    assert math.isclose(token_detail(logits, s.draw(logits), FINAL, s)["entropy"], want, rel_tol=1e-5)


@pytest.mark.parametrize("v", [100_277, 16_512, 300])
def test_top_candidates_are_topk_values(v):
    """The block-maxima search returns torch.topk's values (ids of equal values in any order): rows with
    winners in the tail past the last whole block, bf16-like ties, banned (-inf) ids."""
    g = torch.Generator().manual_seed(v)
    for trial in range(12):
        x = torch.randn(v, generator=g) * (trial % 4 + 0.2)
        if trial % 3 == 0:
            x[-3:] = 50.0
        if trial % 4 == 1:
            x = (x * 2).round()
        if trial % 5 == 2:
            x[::3] = NEG
        for c in (66, 256):
            c = min(c, v)
            want = torch.topk(x, c).values
            vals, ids = sample.top_candidates(x, c)
            assert torch.equal(vals, want) and torch.equal(x[ids], vals)
            assert len(set(ids.tolist())) == c


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_a_draw_leaves_the_callers_row_as_it_was(dt):
    """An fp32 row is penalised in place during a draw and put back; the draw equals one on a copy."""
    g = torch.Generator().manual_seed(4)
    history = [3, 9, 3, 9, 7, 3, 9]  # repeats, and the 2-gram (3, 9) bans 7 after (3, 9)
    for settings in (CARD.with_overrides(seed=1), CARD.with_overrides(temperature=0.0)):
        for _ in range(5):
            logits = (torch.randn(300, generator=g) * 3).to(dt)
            logits[[3, 9, 7]] = torch.tensor([4.0, -2.0, 6.0], dtype=dt)
            before = logits.clone()
            a, b = Sampler(settings, 300, "cpu", history), Sampler(settings, 300, "cpu", history)
            tok = a.draw(logits)
            assert torch.equal(logits, before)
            assert tok == b.draw(logits.clone())
            assert tok != 7  # banned by the n-gram rule


def test_a_draw_outside_inference_mode_takes_an_inference_row():
    with torch.inference_mode():
        logits = torch.tensor([1.0, 3.0, 2.0])
    s = Sampler(SamplingSettings(temperature=0, repetition_penalty=2.0), 3, "cpu", [1])
    assert s.draw(logits) == 2 and logits.tolist() == [1.0, 3.0, 2.0]

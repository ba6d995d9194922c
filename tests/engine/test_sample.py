"""Every sampler setting against the Axiom fixture's sampler tensors or a naive oracle."""
import math

import pytest
import torch
from safetensors.torch import load_file

from chatapp.contract import SamplingSettings
from chatapp.engine.sample import Sampler, apply_temperature_top_k_top_p_min_p, banned_ngram_tokens

CARD = SamplingSettings(temperature=0.2, top_k=50, top_p=0.85, repetition_penalty=1.15, no_repeat_ngram=3)


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


def test_warpers_match_hf_final_scores(golden):
    _same_scores(apply_temperature_top_k_top_p_min_p(golden["sampler_after_rep_penalty_and_ngram"][0], CARD),
                 golden["sampler_hf_final_scores"][0])


def test_authors_sampler_is_the_no_top_k_case(golden):
    w = apply_temperature_top_k_top_p_min_p(golden["sampler_after_rep_penalty_and_ngram"][0],
                                            SamplingSettings(temperature=0.2, top_p=0.85))
    assert torch.allclose(w.softmax(-1), golden["sampler_authors_final_probs"][0], atol=1e-6)


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


def test_repetition_penalty_rule():
    logits = torch.tensor([2.0, -2.0, 0.0, 1.0])
    s = Sampler(SamplingSettings(temperature=0, repetition_penalty=2.0), 4, "cpu", [0, 1, 2])
    assert s.process(logits).tolist() == [1.0, -4.0, 0.0, 1.0]


def test_top_k_keeps_ties_and_top_p_min_p():
    scores = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
    out = apply_temperature_top_k_top_p_min_p(scores, SamplingSettings(temperature=1.0, top_k=2))
    assert torch.isinf(out).tolist() == [False, False, False, True, True]
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    out = apply_temperature_top_k_top_p_min_p(p, SamplingSettings(temperature=1.0, top_p=0.8))
    # Keep an id iff the mass strictly before it is < p: 0 and 0.5 are < 0.8, 0.8 is not.
    assert torch.isinf(out).tolist() == [False, False, True, True]
    out = apply_temperature_top_k_top_p_min_p(p, SamplingSettings(temperature=1.0, min_p=0.25))
    assert torch.isinf(out).tolist() == [False, False, False, True]  # 0.05 < 0.25 x 0.5


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([5.0, 4.9, 0.0])
    s = Sampler(SamplingSettings(temperature=0, repetition_penalty=1.1), 3, "cpu", [0])
    d = s.draw(logits)
    assert d.token_id == 1
    assert math.isclose(d.entropy, float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum()), rel_tol=1e-5)


def test_seeded_sampling_reproduces_and_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    settings = SamplingSettings(temperature=1.0, seed=123)
    draws = [Sampler(settings, 4, "cpu", []).draw(logits).token_id for _ in range(3)]
    assert len(set(draws)) == 1
    s = Sampler(settings, 4, "cpu", [])
    counts = torch.bincount(torch.tensor([s.draw(logits).token_id for _ in range(4000)]), minlength=4).float()
    assert torch.allclose(counts / 4000, logits.softmax(-1), atol=0.03)
    d = s.draw(logits)
    assert math.isclose(d.logprob, float(logits.log_softmax(-1)[d.token_id]), rel_tol=1e-5)


def test_filtered_tokens_are_never_sampled():
    logits = torch.tensor([0.0, 0.1, 0.2, 5.0])
    s = Sampler(SamplingSettings(temperature=2.0, top_k=2, seed=0), 4, "cpu", [])
    assert {s.draw(logits).token_id for _ in range(300)} <= {2, 3}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(repetition_penalty=0), dict(max_new_tokens=0), dict(top_k=-1)])
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingSettings(**bad).validate()

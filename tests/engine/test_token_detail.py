"""The per-token record when asked (issue 15): probabilities, entropy and alternatives equal a softmax of
the very logits each step sampled from (raw by default, after the sampling settings on request); Huginn's
steps on every token; nothing computed when nothing is asked for."""
from __future__ import annotations

import math

import pytest
import torch

from chatapp.contract import Done, SamplingSettings, StepEvent, TokenDetail
from chatapp.engine import generate, token_detail
from chatapp.engine.sample import Sampler

from .conftest import demo_engine

FULL = TokenDetail(logprob=True, entropy=True, alternatives=5)
EPS32 = torch.finfo(torch.float32).eps


def _recording(engine):
    """Wrap the model's forward so every row of next-token logits the call produces is kept, in order
    (the prompt's last row, then one per decoded token)."""
    rows: list[torch.Tensor] = []
    infer = engine.model.infer

    def recorded(*a, **kw):
        out = infer(*a, **kw)
        rows.append(out.logits[0, -1].detach().double().clone())
        return out

    engine.model.infer = recorded
    engine.step = recorded
    return rows


def _run(engine, settings, detail, ids=(1, 2, 3, 4, 5, 6, 7)):
    events = list(engine.generate(list(ids), settings, detail=detail))
    assert isinstance(events[-1], Done)
    return [e for e in events if isinstance(e, StepEvent)]


def _tol(row: torch.Tensor) -> float:
    # fp32 log_softmax: the normaliser's rounding scales with the largest logit magnitude.
    return 64 * EPS32 * max(1.0, float(row.abs().max()))


def _check(events, rows, oracle):
    assert len(rows) >= len(events) > 3
    for ev, row in zip(events, rows):
        lp = oracle(row)
        tol = _tol(row)
        assert ev.logprob == pytest.approx(float(lp[ev.token_id]), abs=tol)
        raw = row.log_softmax(-1)
        assert ev.entropy == pytest.approx(float(-(raw.exp() * raw).sum()), abs=tol * max(1.0, math.log(row.numel())))
        finite = int(torch.isfinite(lp).sum())
        top = lp.topk(min(5, finite))
        assert [i for i, _ in ev.alternatives] == top.indices.tolist()
        assert [v for _, v in ev.alternatives] == pytest.approx(top.values.tolist(), abs=tol)


def test_greedy_records_the_softmax_of_each_steps_logits():
    engine = demo_engine("axiom-tiny", dtype="float32", compile="off")
    rows = _recording(engine)
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=8)
    events = _run(engine, settings, FULL)
    _check(events, rows, lambda row: row.log_softmax(-1))
    for ev, row in zip(events, rows):
        assert ev.token_id == int(row.argmax()) and ev.alternatives[0][0] == ev.token_id


def test_sampling_records_raw_by_default_and_the_settings_distribution_on_request():
    engine = demo_engine("axiom-tiny", dtype="float32", compile="off")
    rows = _recording(engine)
    settings = SamplingSettings(temperature=0.8, top_k=3, repetition_penalty=1.0, seed=11, max_new_tokens=8)
    raw_events = _run(engine, settings, FULL)
    _check(raw_events, rows, lambda row: row.log_softmax(-1))

    def final(row):
        z = row / 0.8
        return z.masked_fill(row < row.topk(3).values[-1], float("-inf")).log_softmax(-1)

    rows.clear()
    events = _run(engine, settings, TokenDetail(logprob=True, entropy=True, alternatives=5, final=True))
    assert [e.token_id for e in events] == [e.token_id for e in raw_events]  # asking changes no draw
    _check(events, rows, final)
    assert all(len(e.alternatives) == 3 for e in events)  # the ids top-k removed are left out


def test_asking_for_nothing_computes_nothing(monkeypatch):
    engine = demo_engine("axiom-tiny", dtype="float32", compile="off")
    calls = []

    def refuse(*a, **kw):
        calls.append(a)
        raise AssertionError("token_detail ran for a call that asked for nothing")

    # (Sampler.draw returns the id alone: the figures exist only in token_detail.)
    monkeypatch.setattr(generate, "token_detail", refuse)
    for settings in (SamplingSettings(temperature=0.0, max_new_tokens=6),
                     SamplingSettings(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=6)):
        events = _run(engine, settings, TokenDetail())
        assert all(e.logprob is None and e.entropy is None and e.alternatives is None for e in events)
    assert not calls
    monkeypatch.setattr(generate, "token_detail", token_detail.token_detail)
    assert _run(engine, SamplingSettings(temperature=0.0, max_new_tokens=4), TokenDetail(entropy=True))[0].entropy > 0


def test_each_figure_only_when_asked():
    logits = torch.tensor([2.0, 1.0, float("-inf"), 0.5])
    sampler = Sampler(SamplingSettings(temperature=0.0), 4, "cpu", [])
    only = token_detail.token_detail(logits, 0, TokenDetail(alternatives=9), sampler)
    assert only["logprob"] is None and only["entropy"] is None
    assert [i for i, _ in only["alternatives"]] == [0, 1, 3]  # -inf ids are not alternatives
    p = torch.tensor([2.0, 1.0, 0.5]).double().softmax(-1)
    ent = token_detail.token_detail(logits, 0, TokenDetail(entropy=True), sampler)["entropy"]
    assert ent == pytest.approx(float(-(p * p.log()).sum()), abs=8 * EPS32)


def test_huginn_reports_the_steps_of_every_token_asked_or_not():
    engine = demo_engine("huginn-tiny", dtype="float32", compile="off")
    settings = SamplingSettings(temperature=0.0, max_new_tokens=5)
    for detail in (TokenDetail(), FULL):
        events = list(engine.generate([1, 2, 3, 4], settings, {"num_steps": 3, "exit_criterion": "none"},
                                      detail=detail))[:-1]
        assert [e.steps for e in events] == [3] * len(events) and events


def test_detail_cost_measures_both_paths():
    engine = demo_engine("axiom-tiny", dtype="float32", compile="off")
    cost = token_detail.detail_cost(engine, [1, 2, 3, 4], new_tokens=6, repeats=1)
    assert cost["off_tok_s"] > 0 and cost["on_tok_s"] > 0
    assert cost["overhead"] == pytest.approx(1 - cost["on_tok_s"] / cost["off_tok_s"])

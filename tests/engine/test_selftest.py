"""`smollchat selftest`: NLL scoring, reading-option ranking, and the misread-checkpoint warning.

Fixtures have no tokenizer, so the machinery is checked on ids sampled from the fixture model itself:
its own reading must come out first among the readings whose logits really differ from it. A model
loaded with a wrong reading must be told which reading the weights support.
"""
from __future__ import annotations

import math

import pytest
import torch

from chatapp.catalog import get_entry
from chatapp.cli import main
from chatapp.engine.arch import odinnext
from chatapp.engine.loader import build_model, load_model
from chatapp.engine.selftest import (CHAT, ENGLISH, SAME_LOGITS, format_report, rank_options, run_selftest, sample_ids,
                                     selftest_model)
from chatapp.engine.tokenizer import load_tokenizer

FIXTURE = "odinnext"

PRIMARY = {k: v[0] for k, v in odinnext.OPTIONS.items()}


def test_own_reading_ranks_first_on_its_own_samples(fx):
    report = run_selftest(fx, seed=1)
    assert report.mode == "sampled ids" and report.architecture == "odinnext"
    assert report.reading == PRIMARY
    assert set(report.options) == set(odinnext.OPTIONS)
    distinct = 0
    for opt, rows in report.options.items():
        cur = next(r for r in rows if r.current)
        assert cur.value == PRIMARY[opt]
        for r in rows:
            if r.current or r.error:
                continue
            if r.logit_diff > SAME_LOGITS:
                distinct += 1
                assert r.nll > cur.nll, f"{opt}={r.value!r} scores {r.nll} <= own reading {cur.nll}"
            else:
                assert r.nll == pytest.approx(cur.nll, abs=1e-6)
        assert report.supported(opt) == PRIMARY[opt]
    # Every alternative except attn_scale=one (5e-5 apart in the fixture) and g_norm=absent really differs.
    assert distinct == sum(len(v) - 1 for v in odinnext.OPTIONS.values()) - 2
    assert next(r for r in report.options["g_norm"] if r.value == "absent").error
    assert report.ok and not report.warnings
    text = format_report(report)
    assert "weights support 'silu_sq_gate'" in text and text.endswith("OK")


@pytest.mark.parametrize("option,wrong", [("ffn_variant", "sq_product"), ("block_norm", "standard"),
                                          ("rope_layout", "half_split")])
def test_a_misread_checkpoint_is_told_which_reading_the_weights_support(fx, option, wrong):
    truth = load_model(fx, "cpu", torch.float32)
    seqs = sample_ids(truth, n_seq=4, length=64, seed=3)
    misread = load_model(fx, "cpu", torch.float32, options={option: wrong})
    report = selftest_model(misread, sequences=seqs)
    assert report.mode == "given ids"
    assert report.supported(option) == PRIMARY[option]
    assert report.better_reading == {option: PRIMARY[option]}
    assert report.suggested == PRIMARY
    assert not report.ok
    assert any(f"{option} = {PRIMARY[option]!r}" in w for w in report.warnings)
    assert "CHECK FAILED" in format_report(report)


def test_reloading_per_option_scores_like_switching_in_place(fx):
    model = load_model(fx, "cpu", torch.float32)
    seqs = sample_ids(model, n_seq=2, length=24, seed=5)

    def in_place(reading):
        model.set_options(**reading)
        return model

    def reload(reading):
        return load_model(fx, "cpu", torch.float32, options=reading)

    switched = rank_options(in_place, PRIMARY, odinnext.OPTIONS, seqs)
    reloaded = rank_options(reload, PRIMARY, odinnext.OPTIONS, seqs)
    for opt in odinnext.OPTIONS:
        for a, b in zip(switched[opt], reloaded[opt]):
            if a.value == "absent":
                continue
            assert a.value == b.value and a.nll == pytest.approx(b.nll, rel=1e-9, abs=1e-12)
    # g_norm 'absent' cannot load this checkpoint's tensors: the reload path says why.
    absent = next(r for r in reloaded["g_norm"] if r.value == "absent")
    assert "g_norm" in absent.error and math.isnan(absent.nll)


def test_random_weights_get_the_implausible_nll_warning():
    entry = get_entry("odinnext-tiny")
    tok = load_tokenizer(entry)
    torch.manual_seed(entry.demo_seed)
    model = build_model(entry.demo_config, entry.options, device="cpu").eval()
    report = selftest_model(model, tok, name=entry.id)
    assert report.mode == "text"
    english, chat = report.texts
    assert english.name == "english paragraph" and english.tokens == len(ENGLISH.encode()) - 1
    # The exchange is scored in the model's own chat format, specials included.
    ids = tok.render(CHAT, add_generation_prompt=False, system="")
    assert chat.name == "chatml exchange" and chat.tokens == len(ids) - 1
    assert ids.count(tok.specials["<|im_start|>"]) == 4
    assert report.nll > 0.6 * math.log(model.vocab_size)
    assert any("implausibly high" in w for w in report.warnings) and not report.ok
    assert "WARNING: NLL" in format_report(report)


def test_other_architectures_run_without_options(fixture_dir):
    report = run_selftest(fixture_dir("axiom"))
    assert report.architecture == "axiom" and report.options == {} and report.ok
    assert len(report.texts) == 4 and all(t.tokens == 47 for t in report.texts)


def test_cli_selftest_on_a_fixture_directory(fx, capsys):
    assert main(["selftest", str(fx)]) == 0
    out = capsys.readouterr().out
    assert "reading options" in out and out.rstrip().endswith("OK")

"""Cached decode ≡ full forward, for every architecture, by one runner.

A prompt fed through the state in chunks (all at once, token by token, a short chunk first, mixed) must
give the logits of one stateless forward over the whole sequence, and leave every layer's state at the
same length. Run on each reference fixture (fp32, its own tolerance) and on each demo architecture at
random weights in fp32 and bf16 (a tolerance from the dtype, relative to the logits' scale).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from chatapp.catalog import get_entry
from chatapp.engine.loader import build_model, load_model
from chatapp.engine.state import StateList

from .closeness import assert_close, dtype_tolerance

CHUNKINGS = {"prefill": (24,), "token-by-token": (1,) * 24, "prompt-then-steps": (7,) + (1,) * 17,
             "short-first": (2, 1, 21), "mixed": (7, 1, 16), "split": (12, 12)}
# Huginn's cache strategies decide where each recurrence step's keys go; each must hold across chunks
# (not compress-s8 at 5 steps: there a prompt token reads its neighbours' same-step slots, a decoded one
# their last overwrite, as in the reference).
HUGINN = dict(state_init="zero", num_steps=5, cache_strategy="full", continuous_compute=False,
              exit_criterion="none", exit_threshold="auto", draft_steps=0)
CALLS = {"axiom": [{}], "byrne": [{}], "genesis": [{}], "odinnext": [{}],
         "huginn": [{"controls": {**HUGINN, "state_init": init, "cache_strategy": strategy}}
                    for init in ("zero", "like-init")
                    for strategy in ("full", "latest-m4", "always-last-m4", "skip-compress-s32")]}
# Chunked and whole forwards sum in other orders (and Huginn iterates its core): measured worst cases are
# 4-54 units in the last place of the logits' scale; the bound leaves about 5x room.
FIXTURE_ULPS = 256
FIXTURES = ("axiom", "byrne", "genesis", "huginn", "odinnext")
DEMOS = {"axiom": "axiom-tiny", "byrne": "byrne-tiny", "genesis": "genesis-tiny", "odinnext": "odinnext-tiny",
         "huginn": "huginn-tiny"}
# Reading options that change the computation path, over the demo entry's own options.
DEMO_OPTIONS = [(name, {}) for name in sorted(DEMOS)] + [("byrne", {"hc_form": "dynamic"})]


@torch.inference_mode()
def run_chunks(model, ids, chunks, dtype, **call):
    """(full-forward logits, chunk-by-chunk logits, the state after the chunks)."""
    full = model(ids, **call)
    state = model.make_state(ids.shape[1] + 8, "cpu", dtype)
    rows, pos = [], 0
    for n in chunks:
        rows.append(model(ids[:, pos:pos + n], state, **call))
        pos += n
    return full, torch.cat(rows, 1), state


def assert_lengths(state, n):
    assert state.length == n
    if isinstance(state, StateList):  # (Huginn's one state holds its per-step slots itself)
        assert all(s.length == n for s in state), [s.length for s in state]


def cases(kinds):
    return [pytest.param(name, chunks, i, id=f"{name}-{label}-{i}")
            for name in kinds for label, chunks in CHUNKINGS.items() for i in range(len(CALLS[name]))]


@pytest.mark.parametrize("name,chunks,call", cases(FIXTURES))
def test_fixture_chunks_equal_the_full_forward(fixtures_root, name, chunks, call):
    d = fixtures_root / name
    if not d.is_dir():
        pytest.skip(f"the {name} fixture is absent from {fixtures_root}")
    model = load_model(d, "cpu", torch.float32)
    ids = load_file(str(d / "golden.safetensors"))["input_ids"][:, :24]
    full, rows, state = run_chunks(model, ids, chunks, torch.float32, **CALLS[name][call])
    assert_lengths(state, ids.shape[1])
    assert_close(rows, full, atol=0.0, rtol=dtype_tolerance(torch.float32, FIXTURE_ULPS), what=f"{name} {chunks}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,options", DEMO_OPTIONS, ids=[n + "".join(f"-{v}" for v in o.values()) for n, o in DEMO_OPTIONS])
def test_demo_architectures_decode_like_their_full_forward(name, options, dtype):
    entry = get_entry(DEMOS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.demo_seed)
        model = build_model(dict(entry.demo_config), {**entry.options, **options}, device="cpu").to(dtype).eval()
    vocab = model.vocab_size
    ids = torch.randint(0, vocab, (1, 30), generator=torch.Generator().manual_seed(2))
    full, rows, state = run_chunks(model, ids, (9,) + (1,) * 21, dtype, **CALLS[name][0])
    assert_lengths(state, ids.shape[1])
    assert full.dtype == torch.float32 and torch.isfinite(full).all()
    # bf16: each token's activations round at 8 bits, a full forward and a cached one in other places.
    rel = 1e-4 if dtype == torch.float32 else 10 * dtype_tolerance(torch.bfloat16, ulps=1)
    assert_close(rows, full, atol=rel * full.abs().max().item(), rtol=0, what=f"{name} {dtype}")

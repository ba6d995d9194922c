"""Huginn through the Engine the CLI and TUI use: the demo entry, per-token steps, controls changed
between turns, self-speculative decoding in the generate loop, and the chat format of spec §7."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from chatapp.catalog import get_entry
from chatapp.contract import Done, StepEvent
from chatapp.engine.loader import build_model
from chatapp.engine.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    # What the demo maker does: the seeded model with the reference init, its state_dict, config.json.
    entry = get_entry("huginn-tiny")
    d = tmp_path_factory.mktemp("huginn-tiny")
    torch.manual_seed(entry.demo_seed)
    model = build_model(entry.demo_config, device="cpu")
    model.init_demo_weights()
    assert sum(p.numel() for p in model.parameters()) == entry.params
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(entry.demo_config))
    return d


@pytest.fixture
def engine(demo_dir):
    # fp32, so that replies compared across differently chunked prefills agree exactly.
    from chatapp.engine.runtime import load_engine

    return load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", model_dir=demo_dir)


def run(engine, ids, controls=None, **settings):
    s = engine.default_settings().with_overrides(**{"max_new_tokens": 10, **settings})
    events = list(engine.generate(ids, s, controls))
    assert isinstance(events[-1], Done) and all(isinstance(e, StepEvent) for e in events[:-1])
    return events[:-1], events[-1]


def test_demo_streams_in_the_catalog_dtype(demo_dir):
    from chatapp.engine.runtime import load_engine

    engine = load_engine(get_entry("huginn-tiny"), device="cpu", model_dir=demo_dir)
    assert engine.dtype == torch.bfloat16 and engine.model.transformer.wte.weight.dtype == torch.bfloat16
    ids = engine.tokenizer.render([{"role": "user", "content": "hi"}], system="Be brief.")
    events, done = run(engine, ids, {"num_steps": 4})
    assert done.stop_reason in ("max_tokens", "eos") and all(e.steps == 4 for e in events)
    assert engine.memory().allocated["kv"] > 0


def test_demo_streams_with_the_steps_of_each_token(engine):
    ids = engine.tokenizer.render([{"role": "user", "content": "hi"}])
    assert engine.resolve()["num_steps"] == 32 and engine.resolve()["cache_strategy"] == "latest-m4"
    events, done = run(engine, ids, {"num_steps": 6})
    assert done.new_tokens == len(events) and all(e.steps == 6 for e in events)
    # Early exit: each token reports its own count, capped by num_steps.
    events, _ = run(engine, ids, {"num_steps": 24, "exit_criterion": "latent-diff", "exit_threshold": 0.2})
    steps = [e.steps for e in events]
    assert all(1 <= s <= 24 for s in steps) and min(steps) < 24
    per_position = engine.state.steps_per_position()
    assert per_position[len(ids):] == steps[1:len(per_position) - len(ids) + 1]


def test_memory_report_counts_the_slots_of_the_chosen_strategy(engine):
    a = engine.model.args
    ids = engine.tokenizer.render([{"role": "user", "content": "how much memory?"}])
    item = torch.tensor([], dtype=engine.dtype).element_size()
    per_slot_token = 2 * a.n_kv_heads * a.head_dim * item
    for controls, slots in (({"num_steps": 5, "cache_strategy": "full"}, 4 * 5 + 4),
                            ({"num_steps": 12, "cache_strategy": "latest-m4-compress-s16"}, 16 + 4)):
        engine.reset()
        _, done = run(engine, ids, controls)
        mem = engine.memory()
        n = engine.state.length
        assert n == len(ids) + done.new_tokens - 1
        assert mem.used["kv"] == slots * n * per_slot_token
        assert mem.allocated["kv"] == slots * 256 * per_slot_token  # one 256-position block per slot
        assert engine.state.kv_report()["total"] == mem.allocated["kv"]
        assert mem.allocated["recurrent"] == a.n_embd * 4  # the warm-start latent, fp32


def test_controls_change_between_turns_without_reloading(engine, demo_dir):
    from chatapp.engine.runtime import load_engine

    first = engine.tokenizer.render([{"role": "user", "content": "one"}])
    before = {"num_steps": 4, "cache_strategy": "full"}
    events, _ = run(engine, first, before)
    second = engine.tokenizer.render([{"role": "user", "content": "one"},
                                      {"role": "assistant", "content": engine.tokenizer.decode(
                                          [e.token_id for e in events])},
                                      {"role": "user", "content": "two"}])
    # A control that only changes how the same tokens are computed (a verified draft) keeps the state.
    _, done = run(engine, second, {**before, "draft_steps": 2}, temperature=0.0)
    assert done.reused_tokens > len(first)  # the prompt and the reply's tokens as far as they re-encode alike
    # Another depth and compression: what the state holds was computed otherwise, so it starts over and
    # answers exactly as a fresh engine does.
    later = {"num_steps": 7, "cache_strategy": "compress-s32", "state_init": "zero"}
    got, done = run(engine, second, later)
    assert done.reused_tokens == 0 and engine.state.strategy.compress == "s"
    fresh = load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", model_dir=demo_dir)
    want, _ = run(fresh, second, later)
    assert [e.token_id for e in got] == [e.token_id for e in want]


@pytest.mark.parametrize("init", ["zero", "like-init"])
def test_speculative_decoding_in_the_loop_gives_the_plain_greedy_reply(engine, init):
    ids = engine.tokenizer.render([{"role": "user", "content": "speculate"}])
    base = {"num_steps": 10, "state_init": init, "cache_strategy": "full"}
    plain, _ = run(engine, ids, {**base, "draft_steps": 0}, max_new_tokens=20)
    engine.model.spec_stats.update(calls=0, drafted=0, accepted=0, plain=0)
    fast, done = run(engine, ids, {**base, "draft_steps": 3, "draft_tokens": 4}, max_new_tokens=20)
    assert [e.token_id for e in fast] == [e.token_id for e in plain]
    assert [e.steps for e in fast] == [10] * len(fast) and done.new_tokens == len(plain)
    stats = engine.model.spec_stats
    assert stats["calls"] >= 1 and stats["calls"] < len(fast)
    # What the state absorbed is what it says it absorbed: a follow-up turn reuses that prefix.
    again, done2 = run(engine, ids + [e.token_id for e in fast[:-1]], {**base, "draft_steps": 0}, max_new_tokens=3)
    assert done2.reused_tokens == len(ids) + len(fast) - 2


def test_a_calls_controls_do_not_outlive_it(engine, demo_dir):
    """Controls chosen in one call (one chat) are not in force in the next call that does not set them."""
    from chatapp.engine.runtime import load_engine

    ids = engine.tokenizer.render([{"role": "user", "content": "leak?"}])
    adaptive = {"num_steps": 16, "exit_criterion": "latent-diff", "exit_threshold": 0.2}
    held, _ = run(engine, ids, {**adaptive, "min_steps": 12, "check_every": 3})
    assert all(e.steps >= 13 for e in held)
    got, _ = run(engine, ids, adaptive)
    fresh = load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", model_dir=demo_dir)
    want, _ = run(fresh, ids, adaptive)
    assert [e.steps for e in got] == [e.steps for e in want] and min(e.steps for e in got) < 12
    assert [e.token_id for e in got] == [e.token_id for e in want]


def test_a_queued_call_does_not_clear_the_cancel_of_the_running_one(engine):
    import threading
    import time

    ids = engine.tokenizer.render([{"role": "user", "content": "queue"}])
    settings = engine.default_settings().with_overrides(max_new_tokens=30, temperature=0.0)
    first = engine.generate(ids, settings, {"num_steps": 2})
    assert isinstance(next(first), StepEvent)  # running: it holds the engine
    engine.cancel()
    queued: list = []
    waiting = threading.Thread(target=lambda: queued.extend(engine.generate(ids, settings, {"num_steps": 2})))
    waiting.start()
    time.sleep(1.0)  # the second call has started and waits for the engine
    rest = list(first)
    assert len(rest) == 1 and rest[0].stop_reason == "cancelled"
    waiting.join(timeout=60)
    assert queued[-1].stop_reason in ("max_tokens", "eos") and len(queued) > 1
    # A caller's own flag stops its call even while that call is still waiting for the engine.
    mine = threading.Event()
    mine.set()
    events = list(engine.generate(ids, settings, {"num_steps": 2}, cancel=mine))
    assert len(events) == 1 and events[0].stop_reason == "cancelled"


def _cancel_at_step(engine, monkeypatch, n):
    """Ask the engine to stop as the n-th recurrence step from now begins (Esc in the TUI)."""
    calls = []
    real = engine.model._step

    def step(*args):
        calls.append(1)
        if len(calls) == n:
            engine.cancel()
        return real(*args)

    monkeypatch.setattr(engine.model, "_step", step)
    return calls


MODES = {"plain": {}, "speculative": {"draft_steps": 2, "draft_tokens": 3},
         "adaptive": {"exit_criterion": "latent-diff", "exit_threshold": 0.05}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["first prompt chunk", "later prompt chunk", "first decode", "second forward",
                                   "later decode"])
def test_stop_inside_the_recurrence_keeps_the_state_consistent(engine, demo_dir, monkeypatch, mode, where):
    # A stop is honoured within one recurrence step, and the state then holds exactly what the engine says
    # it absorbed, so the next turn resumes from it and answers as a fresh engine does.
    from chatapp.engine.runtime import load_engine

    monkeypatch.setattr("chatapp.engine.generate.PREFILL_CHUNK", 4)
    controls = {"num_steps": 12, "cache_strategy": "full", **MODES[mode]}
    ids = engine.tokenizer.render([{"role": "user", "content": "stop me"}])
    fresh = load_engine(get_entry("huginn-tiny"), device="cpu", dtype="float32", model_dir=demo_dir)
    counted = _cancel_at_step(fresh, monkeypatch, 0)
    run(fresh, ids, controls, max_new_tokens=1)
    prompt_steps = len(counted)  # what the chunked prefill runs
    at = {"first prompt chunk": 3, "later prompt chunk": prompt_steps // 2 + 1,
          "first decode": prompt_steps + 2, "second forward": prompt_steps + 14, "later decode": prompt_steps + 40}[where]
    if mode == "speculative" and where == "second forward":
        at = prompt_steps + 4  # inside the second draft: the first draft token is in the cache, not yet in held
    calls = _cancel_at_step(engine, monkeypatch, at)
    events, done = run(engine, ids, controls, max_new_tokens=40)
    assert done.stop_reason == "cancelled" and len(calls) == at  # the step that saw the request never ran
    held = len(engine.cache.held)
    assert engine.state.length == held and engine.cache.held == (ids + [e.token_id for e in events])[:held]
    assert all(buf.length <= held for buf in engine.state.slots.values())
    if "prompt" in where:
        assert not events and "stopped during the prompt" in done.detail
        assert held == (0 if where == "first prompt chunk" else 4 * (held // 4)) and (held > 0) == ("later" in where)
    else:
        assert events and held >= len(ids)
    # Replay the same absorption on the fresh engine (prompt in chunks of 4, then a token per forward; with
    # adaptive exit a chunk's boundaries change its step counts), then both take the next turn.
    fresh.reset()
    for n in sorted({min(held, len(ids))} | set(range(len(ids) + 1, held + 1))):
        if n:
            run(fresh, engine.cache.held[:n], controls, max_new_tokens=1)
    assert fresh.cache.held == engine.cache.held
    monkeypatch.undo()
    follow = ids + [e.token_id for e in events] + engine.tokenizer.encode("go on")
    got, again = run(engine, follow, controls)
    assert again.reused_tokens == held
    want, _ = run(fresh, follow, controls)
    assert [e.token_id for e in got] == [e.token_id for e in want]
    assert [e.steps for e in got] == [e.steps for e in want]


def test_chat_format_renders_the_upload_template():
    entry = get_entry("huginn")
    tok = ByteTokenizer(entry.tokenizer.specials, entry.chat)
    text = tok.render_text([{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": "  What do you think of Goethe's Faust?\n"}])
    assert text == ("<|begin_text|><|begin_header|>system<|end_header|>\n\nYou are a helpful assistant.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\nWhat do you think of Goethe's Faust?<|end_turn|>"
                    "<|begin_header|>Huginn<|end_header|>\n\n")
    ids = tok.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                      {"role": "user", "content": "ok"}])
    # BOS once; a header for the default system prompt, three turns and the generation prompt.
    assert ids.count(65504) == 1 and ids[0] == 65504 and ids.count(65506) == 5
    assert set(tok.stop_ids) == {65508, 65505, 65504}
    assert "<|im_start|>" not in tok.render_text([{"role": "user", "content": "x"}])

"""The fakes the TUI tests stand on: FakeEngine, FakeTokenizer, FakeDownloader."""
from __future__ import annotations

import threading
import time

import pytest

from chatapp.chat.fake import (HUGINN_LIKE_CONTROLS, DownloadCancelled, FakeDownloader, FakeEngine, FakeTokenizer,
                               OfflineError, fake_entry)
from chatapp.contract import Done, SamplingSettings, StepEvent


def collect(gen):
    events = list(gen)
    done = events[-1]
    assert isinstance(done, Done)
    return [e for e in events if isinstance(e, StepEvent)], done


def test_tokenizers_round_trip_text_and_render_chatml():
    for mode in ("word", "bytes"):
        tok = FakeTokenizer(mode)
        text = "Héllo  wörld,\n  tabs\tand emoji 🙂"
        assert tok.decode(tok.encode(text)) == text
        ids = tok.render([{"role": "user", "content": "hi <|im_end|>"}])
        # User text that spells a special token stays text.
        assert ids.count(tok.specials["<|im_end|>"]) == 2
        assert tok.stop_ids == (tok.specials["<|im_end|>"], tok.specials["<|endoftext|>"])
    assert FakeTokenizer("word").encode("a b c") != FakeTokenizer("bytes").encode("a b c")


def test_reply_streams_token_by_token_and_ends_with_eos():
    eng = FakeEngine(["one two three"])
    steps, done = collect(eng.generate([1, 2, 3], SamplingSettings()))
    assert "".join(e.text for e in steps) == "one two three"
    assert steps[-1].token_id == eng.tokenizer.specials["<|im_end|>"] and steps[-1].text == ""
    assert (done.stop_reason, done.prompt_tokens, done.new_tokens) == ("eos", 3, 4)
    assert (done.ttft_s, done.decode_tok_s) == (0.05, 100.0)
    # Instant mode still time-stamps tokens at the fixed rate.
    assert steps[1].t_ns - steps[0].t_ns == 10_000_000


def test_byte_mode_never_splits_a_character():
    eng = FakeEngine(["é🙂"], FakeTokenizer("bytes"))
    steps, done = collect(eng.generate([1], SamplingSettings()))
    assert [e.text for e in steps if e.text] == ["é", "🙂"] and done.new_tokens == 7


def test_replies_cycle_or_come_from_a_callable():
    eng = FakeEngine(["a", "b"])
    texts = ["".join(e.text for e in collect(eng.generate([1], SamplingSettings()))[0]) for _ in range(3)]
    assert texts == ["a", "b", "a"]
    tok = FakeTokenizer()
    echo = FakeEngine(lambda prompt: "echo: " + prompt.split("user\n")[-1].split("<|im_end|>")[0], tok)
    ids = tok.render([{"role": "user", "content": "ping"}])
    assert "".join(e.text for e in collect(echo.generate(ids, SamplingSettings()))[0]) == "echo: ping"


def test_budget_stop_strings_and_context_limit():
    eng = FakeEngine(["one two three four five"], context_limit=10)
    steps, done = collect(eng.generate([1], SamplingSettings(max_new_tokens=2)))
    assert done.stop_reason == "max_tokens" and len(steps) == 2
    steps, done = collect(eng.generate([1], SamplingSettings(stop_strings=("ree",))))
    assert done.stop_reason == "stop_string" and "".join(e.text for e in steps) == "one two th"
    steps, done = collect(eng.generate(list(range(8)), SamplingSettings()))
    assert done.stop_reason == "context_full" and done.new_tokens == 2
    steps, done = collect(eng.generate(list(range(10)), SamplingSettings()))
    assert done.stop_reason == "context_full" and steps == []


def test_cancel_between_tokens_in_instant_and_timed_modes():
    eng = FakeEngine(["w " * 50])
    got = []
    for ev in eng.generate([1], SamplingSettings()):
        got.append(ev)
        if len(got) == 5:
            eng.cancel()
    assert got[-1].stop_reason == "cancelled" and got[-1].new_tokens == 5
    slow = FakeEngine(["w " * 1000], instant=False, tokens_per_s=1000.0, ttft_s=0.01)
    threading.Timer(0.1, slow.cancel).start()
    t0 = time.monotonic()
    steps, done = collect(slow.generate([1], SamplingSettings()))
    assert done.stop_reason == "cancelled" and 10 < len(steps) < 1000
    assert time.monotonic() - t0 < 0.8


def test_timed_mode_paces_tokens():
    eng = FakeEngine(["a b c d e f g h i j"], instant=False, tokens_per_s=100.0, ttft_s=0.05)
    t0 = time.monotonic()
    collect(eng.generate([1], SamplingSettings()))
    assert time.monotonic() - t0 >= 0.05 + 10 * 0.01 * 0.9


def test_memory_counts_kv_per_token_and_a_constant_recurrent_state():
    eng = FakeEngine(["a b c"], weights_bytes=1000, kv_bytes_per_token=10, recurrent_bytes=500, context_limit=100)
    assert eng.memory().used == {"kv": 0, "recurrent": 500}
    collect(eng.generate([1, 2, 3, 4], SamplingSettings()))
    m = eng.memory()
    assert m.weights == 1000 and m.context_used == 4 + 3  # the final stop token is sampled, not absorbed
    assert m.used == {"kv": 70, "recurrent": 500} and m.allocated == {"kv": 1000, "recurrent": 500}


def test_prefix_reuse_is_reported_like_the_real_engine():
    eng = FakeEngine(["x y"])
    _, first = collect(eng.generate([1, 2, 3], SamplingSettings()))
    assert first.reused_tokens == 0
    _, again = collect(eng.generate([1, 2, 3, 5, 6], SamplingSettings()))
    assert again.reused_tokens == 3
    _, same = collect(eng.generate([1, 2, 3, 5, 6], SamplingSettings()))
    assert same.reused_tokens == 4  # at least one token must run to produce logits


def test_controls_are_validated_and_drive_steps():
    eng = FakeEngine(["a b"], controls=HUGINN_LIKE_CONTROLS)
    steps, _ = collect(eng.generate([1], SamplingSettings(), {"num_steps": 7}))
    assert [e.steps for e in steps] == [7, 7, 7]
    assert eng.calls[-1].controls["exit_criterion"] == "none"
    with pytest.raises(ValueError, match="unknown control"):
        collect(eng.generate([1], SamplingSettings(), {"depth": 3}))
    with pytest.raises(ValueError, match="num_steps"):
        collect(eng.generate([1], SamplingSettings(), {"num_steps": 0}))
    cycling = FakeEngine(["a b c d"], steps=[1, 2])
    assert [e.steps for e in collect(cycling.generate([1], SamplingSettings()))[0]] == [1, 2, 1, 2, 1]
    assert FakeEngine(["a"], steps=lambda i, c: 3 + i).generate([1], SamplingSettings()).__next__().steps == 3


def test_scripted_error():
    eng = FakeEngine(["a b c"], error_after=1, error_message="boom")
    gen = eng.generate([1], SamplingSettings())
    assert next(gen).text == "a"
    with pytest.raises(RuntimeError, match="boom"):
        next(gen)


def test_downloader_progress_cancel_resume_and_errors(tmp_path):
    entry = fake_entry("axiom")
    dl = FakeDownloader(files=(("model.safetensors", 1000), ("config.json", 100)), chunk_bytes=300,
                        speed_bps=100.0, root=tmp_path)
    assert not dl.is_downloaded(entry) and dl.local_dir(entry) is None
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if p.done_bytes >= 600:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        dl.download(entry, progress, cancel)
    assert seen[-1].done_bytes == 600 and dl.disk_usage(entry) == 600
    assert seen[0].total_bytes == 1100 and seen[0].eta_s == pytest.approx((1100 - 300) / 100.0)
    seen.clear()
    path = dl.download(entry, progress=seen.append)
    # Resumed at 600, not restarted; chunks stop at file boundaries.
    assert [(p.file, p.done_bytes, p.file_index, p.file_count) for p in seen] == [
        ("model.safetensors", 900, 0, 2), ("model.safetensors", 1000, 0, 2), ("config.json", 1100, 1, 2)]
    assert seen[-1].done_bytes == 1100 and seen[-1].eta_s == 0
    assert path.is_dir() and dl.is_downloaded(entry) and dl.local_dir(entry) == path
    dl.delete(entry)
    assert not dl.is_downloaded(entry) and dl.disk_usage(entry) == 0

    flaky = FakeDownloader(files=(("model.safetensors", 1000),), chunk_bytes=250, fail_at=500, root=tmp_path)
    with pytest.raises(OfflineError, match="connection lost"):
        flaky.download(entry)
    assert flaky.download(entry).is_dir() and flaky.events[-1].done_bytes == 1000
    with pytest.raises(OfflineError, match="no network"):
        FakeDownloader(offline=True, root=tmp_path).download(entry)
    demo = fake_entry("demo-tiny", demo=True)
    assert dl.is_downloaded(demo)


def test_scripted_demo_quotes_the_last_question_and_steps_follow_the_exit_control():
    from chatapp.chat.fake import scripted_demo

    engine = scripted_demo()
    engine.instant = True
    info = engine.info()
    assert (info["n_layers"], info["hidden_size"]) == (24, 768)  # the memory panel's ghost line needs both
    ids = engine.tokenizer.render([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": "Why   is the\nsky blue?"}])
    events = list(engine.generate(ids, SamplingSettings(max_new_tokens=400)))
    text = "".join(e.text for e in events if isinstance(e, StepEvent))
    assert text.startswith("You asked: *Why is the sky blue?*") and events[-1].stop_reason == "eos"
    assert {e.steps for e in events if isinstance(e, StepEvent)} == {32}
    events = list(engine.generate(ids, SamplingSettings(max_new_tokens=20),
                                  {"exit_criterion": "kl", "num_steps": 16, "min_steps": 6}))
    steps = [e.steps for e in events if isinstance(e, StepEvent)]
    assert all(6 <= n <= 16 for n in steps) and len(set(steps)) > 3

"""Session: prompt building (spliced reply ids, system prompts, context trimming), streaming into the
tree, run cards, settings layering, cancel/error/continue, saving while streaming."""
from __future__ import annotations

import threading

import pytest

from chatapp.catalog import load_catalog
from chatapp.chat import session as session_mod
from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import HUGINN_LIKE_CONTROLS, FakeEngine, FakeTokenizer, fake_entry
from chatapp.chat.session import ContextOverflow, Session
from chatapp.chat.store import Store
from chatapp.contract import Done, StepEvent
from chatapp.engine.tokenizer import load_tokenizer


def make(replies=("Hi there, friend!", "Second reply here.", "Third one."), **kw):
    tok = kw.pop("tokenizer", None) or FakeTokenizer()
    entry = kw.pop("entry", None) or fake_entry()
    store = kw.pop("store", None)
    eng = FakeEngine(list(replies), tok, **kw)
    return eng, Session(eng, tok, entry, store=store)


def run(gen) -> Done:
    events = list(gen)
    assert isinstance(events[-1], Done) and all(isinstance(e, StepEvent) for e in events[:-1])
    return events[-1]


def dicts(msgs):
    return [{"role": m.role, "content": m.content} for m in msgs]


def test_first_prompt_is_the_models_own_rendering():
    eng, s = make()
    c = Conversation()
    u = c.add(None, "user", "hello")
    assert s.prompt_ids(c, u.id) == eng.tokenizer.render([{"role": "user", "content": "hello"}])
    c.system_prompt = "Talk like a pirate."
    assert "Talk like a pirate." in eng.tokenizer.decode(s.prompt_ids(c))
    c.system_prompt = ""
    assert "system" not in eng.tokenizer.decode(s.prompt_ids(c))
    c.system_prompt = None
    assert "You are a helpful assistant." in eng.tokenizer.decode(s.prompt_ids(c))


def test_stream_fills_the_reply_and_its_run_card():
    eng, s = make()
    c = Conversation()
    u = c.add(None, "user", "hello")
    done = run(s.stream(c, u.id))
    reply = c.get(c.current_leaf)
    assert reply.parent_id == u.id and reply.role == "assistant"
    assert reply.content == "Hi there, friend!" and reply.status == "ok"
    assert eng.tokenizer.decode(reply.token_ids[:-1]) == reply.content
    card = reply.run
    assert card["model_id"] == "fake" and card["revision"] == "fake-rev"
    assert card["stop_reason"] == "eos" == done.stop_reason
    assert card["prompt_tokens"] == len(eng.calls[0].ids) and card["new_tokens"] == done.new_tokens
    assert card["timings"] == {"ttft_s": 0.05, "prefill_tok_s": done.prefill_tok_s, "decode_tok_s": 100.0}
    assert card["settings"]["temperature"] == 0.7 and card["settings"]["max_new_tokens"] == 256
    assert isinstance(card["seed"], int) and eng.calls[0].settings.seed == card["seed"]
    assert len(card["tokens"]["logprob"]) == done.new_tokens == len(card["tokens"]["entropy"])
    assert "steps" not in card
    assert card["system_prompt"] == "You are a helpful assistant."
    assert c.model_id == "fake"


def test_next_prompt_extends_the_last_one_with_the_generated_ids():
    eng, s = make(tokenizer=FakeTokenizer("bytes"))
    c = Conversation()
    u = c.add(None, "user", "héllo")
    run(s.stream(c, u.id))
    first = eng.calls[0].ids
    reply = c.get(c.current_leaf)
    u2 = c.add(reply.id, "user", "again")
    done = run(s.stream(c, u2.id))
    second = eng.calls[1].ids
    generated = reply.token_ids[:-1]  # without the stop token, which the template writes back
    assert second[:len(first) + len(generated)] == first + generated
    # The engine kept everything its state had absorbed (the stop token was sampled, never fed).
    assert done.reused_tokens == len(first) + len(reply.token_ids) - 1
    assert eng.tokenizer.decode(second) == eng.tokenizer.render_text(dicts(c.path(u2.id)))
    assert s.last_prompt.reused == [reply.id]


def test_real_bpe_reply_ids_are_reused_even_when_reencoding_differs():
    entry = load_catalog()["axiom"]  # tiktoken cl100k with ChatML, system prefixed to the first user turn
    tok = load_tokenizer(entry)
    eng, s = make(tokenizer=tok, entry=entry, context_limit=1024)
    c = Conversation(system_prompt="Be kind.")
    u = c.add(None, "user", "Say hello")
    # " hello" generated as " hel" + "lo": re-encoding the text would give the single id for " hello".
    odd = tok.encode_ordinary("Well") + tok.encode_ordinary(" hel") + tok.encode_ordinary("lo")
    im_end = tok.specials["<|im_end|>"]
    a = c.add(u.id, "assistant", "Well hello", token_ids=odd + [im_end])
    u2 = c.add(a.id, "user", "Again")
    ids = s.prompt_ids(c, u2.id)
    head = tok.render(dicts([u]), add_generation_prompt=True, system="Be kind.")
    assert ids[:len(head) + len(odd)] == head + odd
    plain = tok.render(dicts([u, a, u2]), system="Be kind.")
    assert ids != plain and tok.decode(ids) == tok.decode(plain)
    assert tok.decode(ids).startswith("<|im_start|>user\nBe kind. Say hello<|im_end|>")


def test_replies_whose_ids_no_longer_match_are_rendered_as_text():
    eng, s = make(tokenizer=FakeTokenizer("bytes"))
    c = Conversation()
    u = c.add(None, "user", "hi")
    a = c.add(u.id, "assistant", "edited text", token_ids=list(b"original text"))
    u2 = c.add(a.id, "user", "next")
    ids = s.prompt_ids(c, u2.id)
    assert ids == eng.tokenizer.render(dicts([u, a, u2]))
    assert s.last_prompt.reused == []
    edited = c.edit(a.id, "hand-written")
    u3 = c.add(edited.id, "user", "and?")
    assert s.prompt_ids(c, u3.id) == eng.tokenizer.render(dicts([u, edited, u3]))


def test_a_special_token_the_model_emitted_mid_reply_is_spliced_back_too():
    eng, s = make(tokenizer=FakeTokenizer("bytes"))
    tok = eng.tokenizer
    c = Conversation()
    u = c.add(None, "user", "hi")
    odd = list(b"Hello") + [tok.specials["<|im_start|>"]] + list(b" there")
    # The shown text skips the special (as the stream did); the ids keep it.
    a = c.add(u.id, "assistant", "Hello there", token_ids=odd + [tok.specials["<|im_end|>"]])
    u2 = c.add(a.id, "user", "next")
    p = s.prompt(c, u2.id)
    assert p.reused == [a.id]
    head = tok.render(dicts([u]))
    assert p.ids[:len(head) + len(odd)] == head + odd


def long_chat(turns: int, words: int = 12) -> Conversation:
    c = Conversation()
    parent = None
    for i in range(turns):
        parent = c.add(parent, "user", f"question {i} " + "word " * words).id
        parent = c.add(parent, "assistant", f"answer {i} " + "reply " * words).id
    c.add(parent, "user", "last question")
    return c


@pytest.mark.parametrize("limit", [110, 140, 160, 200, 250, 300])
def test_context_trimming_drops_the_fewest_oldest_whole_turns(limit):
    eng, s = make(context_limit=limit, entry=fake_entry(generation={"max_new_tokens": 40}))
    c = long_chat(8)
    p = s.prompt(c)
    assert len(p.ids) + 40 <= limit
    assert p.dropped_turns > 0 and len(p.dropped) == 2 * p.dropped_turns
    path = c.path()
    assert p.dropped == [m.id for m in path[:len(p.dropped)]]
    # Whole turns: the prompt is exactly the model's rendering of what was kept.
    assert p.ids == eng.tokenizer.render(dicts(p.messages))
    assert p.messages[0].content.startswith(f"question {p.dropped_turns} " if p.dropped_turns < 8 else "last")
    # Dropping one turn fewer would not leave room for the reply plus the headroom (a quarter of the
    # context, when that can be had at all).
    target = limit - int(limit * session_mod.TRIM_HEADROOM)
    fewer = len(eng.tokenizer.render(dicts(path[len(p.dropped) - 2:]))) + 40
    assert fewer > (target if len(p.ids) + 40 <= target else limit)
    done = run(s.stream(c, c.current_leaf))
    card = c.get(c.current_leaf).run
    assert card["context"]["dropped_turns"] == p.dropped_turns
    assert card["context"]["dropped_messages"] == p.dropped
    assert done.prompt_tokens == len(p.ids)


def test_a_trimmed_chat_keeps_its_start_so_a_recurrent_state_continues():
    """Dropping one turn per new turn would change the prompt's start every time and force a
    recurrent state to prefill everything again; the start stays put while the prompt fits."""
    entry = fake_entry(generation={"max_new_tokens": 12})
    eng, s = make(replies=["a short answer with several words in it"], entry=entry, context_limit=200,
                  recurrent_bytes=1000, kv_bytes_per_token=0)
    c = Conversation()
    parent, starts, restarts = None, [], 0
    for i in range(16):
        parent = c.add(parent, "user", f"question {i} about things").id
        done = run(s.stream(c, parent))
        parent = c.current_leaf
        starts.append(s.last_prompt.messages[0].id)
        if i and starts[-1] == starts[-2]:
            assert done.reused_tokens > 0  # same start: the state continued
        restarts += done.reused_tokens == 0
        assert done.prompt_tokens + 12 <= 200
    assert s.last_prompt.dropped_turns > 0
    assert restarts <= 5, restarts  # trimming one turn at a time would restart on every trimmed turn


def test_a_latest_turn_too_long_for_the_context_is_a_clear_error():
    eng, s = make(context_limit=40)
    c = long_chat(2)
    leaf = c.add(c.current_leaf, "assistant", "ok")
    u = c.add(leaf.id, "user", "word " * 100)
    n = len(c.messages)
    with pytest.raises(ContextOverflow, match="holds 40"):
        list(s.stream(c, u.id))
    assert len(c.messages) == n and eng.calls == []
    assert s.context_usage(c) == (40, 40)


def test_builtin_presets_layer_like_saved_ones_without_a_store():
    entry = fake_entry(generation={"temperature": 0.3, "top_k": 40, "max_new_tokens": 99})
    eng, s = make(entry=entry)  # the one-shot CLI has no store: built-ins still resolve
    c = Conversation(settings={"preset": "precise (built-in)", "max_new_tokens": 5})
    got = s.settings_for(c)
    assert (got.temperature, got.top_k, got.top_p, got.max_new_tokens) == (0.2, 40, 0.9, 5)
    c.settings = {"preset": "card (built-in)"}
    assert s.settings_for(c) == entry.sampling()


def test_settings_layer_catalog_then_preset_then_chat(tmp_path):
    with Store(tmp_path / "db.sqlite3") as store:
        store.save_preset("creative", {"temperature": 1.1, "top_p": 0.9, "max_new_tokens": 77})
        entry = fake_entry(generation={"temperature": 0.3, "top_k": 40, "max_new_tokens": 99})
        eng, s = make(entry=entry, store=store)
        c = Conversation()
        assert s.settings_for(c).temperature == 0.3 and s.settings_for(c).top_k == 40
        c.settings = {"preset": "creative"}
        got = s.settings_for(c)
        assert (got.temperature, got.top_p, got.top_k, got.max_new_tokens) == (1.1, 0.9, 40, 77)
        c.settings = {"preset": "creative", "temperature": 0.0, "stop_strings": ["END"]}
        got = s.settings_for(c)
        assert (got.temperature, got.top_p, got.stop_strings) == (0.0, 0.9, ("END",))
        c.settings = {"preset": "gone"}
        with pytest.raises(ValueError, match="gone"):
            s.settings_for(c)
        c.settings = {"temprature": 1}
        with pytest.raises(ValueError, match="temprature"):
            s.settings_for(c)
        c.settings = {"top_p": 5}
        with pytest.raises(ValueError, match="top_p"):
            s.settings_for(c)


def test_a_chosen_seed_is_passed_and_recorded():
    eng, s = make()
    c = Conversation(settings={"seed": 1234})
    u = c.add(None, "user", "hi")
    run(s.stream(c, u.id))
    assert eng.calls[0].settings.seed == 1234 and c.get(c.current_leaf).run["seed"] == 1234


def test_controls_and_per_token_steps_land_in_the_run_card():
    entry = fake_entry(controls={"num_steps": 16, "exit_criterion": "kl"})
    eng, s = make(entry=entry, controls=HUGINN_LIKE_CONTROLS)
    c = Conversation(controls={"num_steps": "8", "not_a_control": 1})
    u = c.add(None, "user", "hi")
    done = run(s.stream(c, u.id))
    card = c.get(c.current_leaf).run
    assert eng.calls[0].controls["num_steps"] == 8 and eng.calls[0].controls["exit_criterion"] == "kl"
    # The card records every control in force, defaults included: architecture < catalog < chat.
    defaults = {spec.name: spec.default for spec in HUGINN_LIKE_CONTROLS}
    assert card["controls"] == {**defaults, "num_steps": 8, "exit_criterion": "kl"} == dict(eng.calls[0].controls)
    assert card["steps"] == [8] * done.new_tokens
    c.controls = {"num_steps": 1000}
    with pytest.raises(ValueError, match="num_steps"):
        s.controls_for(c)


def test_cancel_keeps_the_partial_reply_marked_stopped():
    eng, s = make(replies=["one two three four five six seven"])
    c = Conversation()
    u = c.add(None, "user", "count")
    events = []
    for ev in s.stream(c, u.id):
        events.append(ev)
        if len(events) == 3:
            s.cancel()
    done = events[-1]
    assert done.stop_reason == "cancelled" and done.new_tokens == 3
    reply = c.get(c.current_leaf)
    assert reply.content == "one two three" and reply.status == "stopped"
    assert reply.run["stop_reason"] == "cancelled" and reply.can_continue


def test_cancel_from_another_thread_while_streaming_in_real_time():
    eng, s = make(replies=["word " * 200], instant=False, tokens_per_s=500.0, ttft_s=0.0)
    c = Conversation()
    u = c.add(None, "user", "go")
    timer = threading.Timer(0.05, s.cancel)
    timer.start()
    done = run(s.stream(c, u.id))
    timer.join()
    assert done.stop_reason == "cancelled" and 0 < done.new_tokens < 200
    assert c.get(c.current_leaf).status == "stopped"


def test_closing_the_stream_early_keeps_the_partial_reply(tmp_path):
    with Store(tmp_path / "db.sqlite3") as store:
        eng, s = make(replies=["a b c d e f"], store=store)
        c = Conversation()
        u = c.add(None, "user", "go")
        gen = s.stream(c, u.id)
        next(gen), next(gen)
        gen.close()
        reply = c.get(c.current_leaf)
        assert reply.status == "stopped" and reply.content == "a b"
        saved = store.load(c.id).get(reply.id)
        assert saved.status == "stopped" and saved.content == "a b"


def test_an_engine_error_is_saved_on_the_reply_and_raised(tmp_path):
    with Store(tmp_path / "db.sqlite3") as store:
        eng, s = make(replies=["a b c d"], error_after=2, error_message="device lost", store=store)
        c = Conversation()
        u = c.add(None, "user", "go")
        with pytest.raises(RuntimeError, match="device lost"):
            list(s.stream(c, u.id))
        reply = store.load(c.id).get(c.current_leaf)
        assert reply.status == "error" and reply.content == "a b"
        assert "device lost" in reply.run["error"]


def test_the_reply_is_saved_while_it_streams(tmp_path, monkeypatch):
    monkeypatch.setattr(session_mod, "SAVE_EVERY_S", 0.0)
    with Store(tmp_path / "db.sqlite3") as store:
        eng, s = make(replies=["one two three four"], store=store)
        c = Conversation()
        u = c.add(None, "user", "go")
        seen = []
        for ev in s.stream(c, u.id):
            if isinstance(ev, StepEvent) and len(seen) < 2:
                saved = store.load(c.id)
                seen.append(saved.get(saved.current_leaf).content)
        # Each token is saved before the UI gets it: what is shown is already on disk.
        assert seen == ["one", "one two"]
        final = store.load(c.id).get(c.current_leaf)
        assert final.status == "ok" and final.content == "one two three four"
        assert final.run["stop_reason"] == "eos"


def test_continue_appends_to_a_cut_off_reply():
    entry = fake_entry(generation={"max_new_tokens": 3})
    eng, s = make(replies=["alpha beta gamma delta", " epsilon zeta"], entry=entry)
    c = Conversation()
    u = c.add(None, "user", "go")
    run(s.stream(c, u.id))
    reply = c.get(c.current_leaf)
    assert reply.content == "alpha beta gamma" and reply.can_continue
    first = eng.calls[0].ids
    done = run(s.stream(c, u.id, continue_from=reply.id))
    # The prompt is the reply left open: the old prompt plus exactly the ids generated so far.
    assert eng.calls[1].ids == first + reply.token_ids[:3]
    assert done.reused_tokens == len(first) + 2
    assert c.current_leaf == reply.id and len(c.children(u.id)) == 1
    assert reply.content == "alpha beta gamma epsilon zeta" and reply.status == "ok"
    assert reply.run["stop_reason"] == "eos" and reply.run["new_tokens"] == 3 + done.new_tokens
    assert len(reply.run["continued"]) == 1 and reply.run["continued"][0]["stop_reason"] == "eos"
    assert len(reply.run["tokens"]["logprob"]) == 3 + done.new_tokens
    assert eng.tokenizer.decode(reply.token_ids[:-1]) == reply.content


def test_continue_is_refused_where_it_makes_no_sense():
    eng, s = make()
    c = Conversation()
    u = c.add(None, "user", "go")
    a = c.add(u.id, "assistant", "x", run={"stop_reason": "max_tokens"})
    c.add(a.id, "user", "later")
    with pytest.raises(ValueError, match="already has answers"):
        list(s.stream(c, u.id, continue_from=a.id))
    with pytest.raises(ValueError, match="assistant"):
        list(s.stream(c, None, continue_from=u.id))


def test_regenerate_adds_a_sibling_and_keeps_the_old_reply():
    eng, s = make(replies=["first", "second"])
    c = Conversation()
    u = c.add(None, "user", "go")
    run(s.stream(c, u.id))
    old = c.current_leaf
    run(s.regenerate(c, old))
    assert [m.content for m in c.children(u.id)] == ["first", "second"]
    assert c.sibling_index(c.current_leaf) == (1, 2)
    # Both replies were generated from the same prompt.
    assert eng.calls[0].ids == eng.calls[1].ids


def test_memory_and_context_usage_come_from_the_engine():
    eng, s = make(kv_bytes_per_token=100, context_limit=500)
    c = Conversation()
    u = c.add(None, "user", "hello")
    used, limit = s.context_usage(c)
    assert used == len(s.prompt_ids(c)) and limit == 500
    run(s.stream(c, u.id))
    report = s.memory()
    assert report.used["kv"] == 100 * report.context_used and report.context_used > used


_REAL_ENGINE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from chatapp.catalog import load_catalog
from chatapp.chat.conversation import Conversation
from chatapp.chat.session import Session
from chatapp.chat.store import Store
from chatapp.engine.runtime import load_engine
out = {}
for model_id in sys.argv[1:]:
    engine = load_engine(load_catalog()[model_id], device="cpu")
    with Store() as store:
        s = Session(engine, store=store)
        c = Conversation(settings={"max_new_tokens": 12})
        u = c.add(None, "user", "Hello there!")
        first = list(s.stream(c, u.id))[-1]
        u2 = c.add(c.current_leaf, "user", "Tell me more.")
        second = list(s.stream(c, u2.id))[-1]
        saved = store.load(c.id).get(c.current_leaf)
        saved_ids = saved.token_ids == c.get(c.current_leaf).token_ids
        # Editing the second question: the engine's prompt cache resumes after reply 1 (trimmed, or restored).
        edited = c.edit(u2.id, "Tell me less.")
        third = list(s.stream(c, edited.id))[-1]
        out[model_id] = {"held": first.prompt_tokens + first.new_tokens - 1, "reused": second.reused_tokens,
                         "edit_reused": third.reused_tokens, "cache_bytes": s.memory().prompt_cache,
                         "stop": second.stop_reason, "saved_ids": saved_ids,
                         "revision": saved.run["revision"], "demo": saved.run["demo"]}
print(json.dumps(out))
"""


def test_real_engine_continues_its_state_across_turns():
    """The demo checkpoints through the real engine (in a child process: this one stays torch-free):
    the second turn's prompt extends everything the state absorbed, for a KV and a recurrent model."""
    pytest.importorskip("chatapp.hub")
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    models = ["axiom-tiny", "odinnext-tiny", "genesis-tiny"]
    proc = subprocess.run([sys.executable, "-c", _REAL_ENGINE, *models], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(models)
    for model_id, r in result.items():
        assert r["reused"] == r["held"], model_id
        assert r["stop"] in ("max_tokens", "eos") and r["saved_ids"] and r["demo"] is True, model_id
        assert r["edit_reused"] >= r["held"], model_id
        assert r["cache_bytes"] > 0, model_id


def test_a_warm_session_builds_the_same_prompts_as_a_fresh_one():
    """The prefix memo must never serve a stale prompt: edits, continues, deletes and trimming."""
    tok = FakeTokenizer("word")
    entry = fake_entry(generation={"max_new_tokens": 2})
    eng, s = make(replies=["alpha beta gamma", "delta epsilon zeta", "eta"], tokenizer=tok, entry=entry,
                  context_limit=55)

    def check(leaf=None):
        fresh = Session(eng, tok, entry)
        fresh._trim_starts = dict(s._trim_starts)  # the same trimming history, none of the memo
        assert s.prompt(c, leaf).ids == fresh.prompt(c, leaf).ids

    c = Conversation()
    u = c.add(None, "user", "one")
    for i in range(4):
        run(s.stream(c, u.id))
        check()
        u = c.add(c.current_leaf, "user", f"turn {i}")
        check()
    assert s.last_prompt.dropped_turns > 0 and s.last_prompt.reused
    c.delete(u.id)
    check()
    last = c.get(c.current_leaf)
    assert last.role == "assistant" and last.can_continue
    run(s.stream(c, last.parent_id, continue_from=last.id))
    check()
    # The same message id with more text (a chat reloaded after another window continued it), as
    # ids that differ from a fresh encoding of the text.
    last.token_ids = tok.encode(last.content) + tok.encode(" more") + tok.encode(" words")
    last.content += " more words"
    check()
    c.edit(c.path()[1].id, "hand-edited early reply")
    check()
    c.system_prompt = "Different system prompt."
    check()


@pytest.mark.parametrize("model_id", sorted(k for k, e in load_catalog().items() if not e.demo))
def test_every_catalog_chat_format_keeps_the_state_across_turns(model_id):
    """Splicing works with each model's own template (Huginn's headers and trimming, Genesis's newline
    before <|im_end|>, Axiom's system-in-first-user): turn 2 extends all that turn 1 left in the state."""
    from chatapp.engine.tokenizer import ByteTokenizer

    entry = load_catalog()[model_id]
    tok = ByteTokenizer({s: 256 + i for i, s in enumerate(entry.tokenizer.specials)}, entry.chat)
    eng, s = make(replies=["Hello there", "Fine, thanks"], tokenizer=tok, entry=entry, context_limit=4096)
    c = Conversation(system_prompt="Be brief.")
    u = c.add(None, "user", "Hi")
    first = run(s.stream(c, u.id))
    reply = c.get(c.current_leaf)
    assert reply.token_ids[-1] == tok.stop_ids[0] and reply.content == "Hello there"
    u2 = c.add(reply.id, "user", "How are you?")
    second = run(s.stream(c, u2.id))
    assert second.reused_tokens == first.prompt_tokens + first.new_tokens - 1
    assert tok.decode(eng.calls[1].ids) == tok.render_text(dicts(c.path(u2.id)), system="Be brief.")




def test_reply_ids_outside_the_vocabulary_are_dropped_and_the_text_re_encoded():
    """An imported chat (or another model's) may carry any ids: the prompt never sends them."""
    tok = FakeTokenizer("bytes")
    eng, s = make(tokenizer=tok)
    c = Conversation()
    u = c.add(None, "user", "hi")
    reply = c.add(u.id, "assistant", "ok", token_ids=[ord("o"), ord("k"), 10**9])
    u2 = c.add(reply.id, "user", "more")
    prompt = s.prompt(c, u2.id)
    assert prompt.ids == tok.render(dicts(c.path(u2.id))) and reply.id not in prompt.reused
    assert max(prompt.ids) < tok.vocab_size
    # Ids that fit and still spell the text are spliced in as generated.
    reply.token_ids = [ord("o"), ord("k"), tok.stop_ids[0]]
    assert reply.id in s.prompt(c, u2.id).reused


def test_raw_completion_skips_the_chat_template_and_stores_nothing():
    tok = FakeTokenizer("word")
    entry = fake_entry(controls={"num_steps": 16}, generation={"temperature": 0.0, "max_new_tokens": 3})
    with Store() as store:
        eng, s = make(replies=["and then"], tokenizer=tok, entry=entry, controls=HUGINN_LIKE_CONTROLS, store=store)
        done = run(s.complete("Once upon a time", controls={"min_steps": 2}))
        assert store.list_chats() == []
    call = eng.calls[-1]
    assert call.ids == tok.encode("Once upon a time", allow_special=False) and done.new_tokens == 3
    assert call.controls["num_steps"] == 16 and call.controls["min_steps"] == 2 and call.settings.temperature == 0.0
    with pytest.raises(ValueError, match="unknown control"):
        s.complete("x", controls={"nonsense": 1})
    with pytest.raises(ValueError, match="empty"):
        s.complete("")

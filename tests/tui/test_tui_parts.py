"""The TUI's plain parts without a running app: figures, the key table and keys.toml, theme files,
and the streaming pump (batching, cancel, errors)."""
from __future__ import annotations

import pytest

from chatapp import textsafe
from chatapp.chat.conversation import Conversation
from chatapp.chat.fake import FakeEngine, FakeTokenizer, fake_entry
from chatapp.chat.session import Session
from chatapp.contract import Done, StepEvent
from chatapp.tui import figures
from chatapp.tui.keys import KEYS, KeymapError, bindings, load_keymap
from chatapp.tui.messages import MemorySample, ReplyChunk, ReplyFinished, ReplyStats
from chatapp.tui.streaming import pump
from chatapp.tui.themes import ThemeError, load_themes, shipped_theme_dir, theme_from_toml


def test_human_durations():
    assert figures.human_duration(0.05) == "50 ms" and figures.human_duration(2.5) == "2.5 s"
    assert figures.human_duration(125) == "2m05s"


def test_control_characters_are_shown_not_sent_to_the_terminal():
    assert textsafe.displayable("a\x1b[2Jb\x0f\tc\nd\x7f\x9b") == "a␛[2Jb␏\tc\nd␡\ufffd"


def test_strip_controls_drops_escape_sequences_for_a_tty():
    """What the one-shot CLI writes to a terminal: no sequence survives (the pane title, colours)."""
    title = "a\x1b]2;pwned\x07b\x1b]0;x\x1b\\c\x1b[31mred\x1b[0m\td\ne\x9b2Jf\x00\x7f\x1bcg"
    assert textsafe.strip_controls(title) == "abcred\td\nefg"
    assert textsafe.strip_controls("plain text, [markup] kept") == "plain text, [markup] kept"


def test_plain_is_never_read_as_markup():
    content = textsafe.plain("[@click=app.quit]x[/] \x1b]2;t\x07", "bold")
    assert content.plain == "[@click=app.quit]x[/] ␛]2;t␇"
    assert not any("click" in str(span.style) for span in content.spans)


def test_run_line_names_every_figure():
    run = {"new_tokens": 42, "stop_reason": "max_tokens", "reused_tokens": 30,
           "timings": {"ttft_s": 0.12, "prefill_tok_s": 850.4, "decode_tok_s": 31.25}}
    assert figures.run_line(run) == ("42 tokens · TTFT 120 ms · prefill 850 tok/s · decode 31.2 tok/s · "
                                     "token limit · prefill skipped 30 tok")
    assert figures.run_line({}) == ""
    assert figures.run_line({"new_tokens": 1, "context": {"dropped_turns": 2}}) == (
        "1 tokens · 2 oldest turns left out to fit the context")


def test_ghost_is_bf16_k_and_v_for_every_layer():
    # Genesis-sized: 30 layers x 576 wide at 1,000 tokens.
    assert figures.ghost_kv_bytes(30, 576, 1000) == 2 * 30 * 576 * 2 * 1000


def test_steps_summary_and_saving():
    mean, peak, saving = figures.steps_summary([32, 8, None, 4, 16], budget=32)
    assert (mean, peak) == (15.0, 32)
    assert saving == pytest.approx(1 - 60 / 128)
    assert figures.steps_summary([None, None], 32) == (0.0, 0, None)


def test_sparkline_shares_a_scale_and_resamples():
    assert figures.sparkline([1, 2, 4, 8], 4, top=8) == "▂▃▅█"
    assert figures.sparkline([8, 8], 2, top=16) == "▅▅"  # half of the shared top, not full height
    assert len(figures.sparkline(list(range(1000)), 20)) == 20
    assert figures.bucket_max([1, 5, 2, 9, 3, 4], 3) == [5, 9, 4]


def test_every_binding_has_a_unique_id_and_known_scope():
    ids = [k.id for k in KEYS]
    assert len(ids) == len(set(ids))
    assert all(b.id for b in bindings("chat")) and {b.id for b in bindings("models")} == {
        k.id for k in KEYS if k.scope == "models"}


def test_keymap_file(tmp_path):
    path = tmp_path / "keys.toml"
    assert load_keymap(path) == {}
    path.write_text('[keys]\n"composer.send" = "ctrl+j, alt+enter"\n')
    assert load_keymap(path) == {"composer.send": "ctrl+j,alt+enter"}
    path.write_text('[keys]\n"composer.sned" = "x"\n')
    with pytest.raises(KeymapError, match="unknown binding id 'composer.sned'"):
        load_keymap(path)
    path.write_text('[keys\n')
    with pytest.raises(KeymapError, match="keys.toml"):
        load_keymap(path)


def test_shipped_themes_parse_and_bad_ones_are_reported(tmp_path):
    themes, problems = load_themes([shipped_theme_dir()])
    assert problems == [] and {"smoll-dark", "smoll-light", "smoll-amber", "smoll-contrast"} <= {t.name for t in themes}
    assert all({"mem-state", "mem-kv", "mem-ghost"} <= set(t.variables) for t in themes)
    (tmp_path / "x.toml").write_text('name = "x"\nprimary = "#123456"\nsurfce = "#000000"\n')
    with pytest.raises(ThemeError, match="unknown key"):
        theme_from_toml(tmp_path / "x.toml")
    (tmp_path / "y.toml").write_text('primary = "#123456"\n')
    themes, problems = load_themes([tmp_path])
    assert themes == [] and len(problems) == 2


class Clock:
    """Time that moves only when a token is made (11 ms each)."""

    t = 0.0

    def __call__(self):
        return self.t


def events(texts, clock, steps=None):
    for i, t in enumerate(texts):
        clock.t += 0.011
        yield StepEvent(i, t, 1000 + i, -0.1, 1.0, steps=steps[i] if steps else None)
    yield Done("eos", 3, len(texts), 0.05, 60.0, 100.0, text="!")


def test_pump_batches_text_about_every_30_ms_and_keeps_every_character():
    posted, clock = [], Clock()
    done = pump(events(list("abcdefghi"), clock, list(range(9))), conv_id="c", message_id=lambda: "m",
                post=posted.append, is_cancelled=lambda: False, cancel=lambda: None, interval=0.03, clock=clock)
    chunks = [p for p in posted if isinstance(p, ReplyChunk)]
    assert [c.text for c in chunks] == ["abc", "def", "ghi", "!"]  # 3 tokens of 11 ms, then Done's tail
    assert [s for c in chunks for s in c.steps] == list(range(9))
    assert isinstance(posted[-1], ReplyFinished) and posted[-1].done is done and done.stop_reason == "eos"
    assert [p.new_tokens for p in posted if isinstance(p, ReplyStats)][-1] == 9


def test_pump_cancels_the_engine_once_and_drains_to_done():
    engine = FakeEngine([" ".join(["w"] * 50)])
    session = Session(engine, FakeTokenizer(), fake_entry())
    conv = Conversation()
    q = conv.add(None, "user", "go")
    posted, calls = [], []
    state = {"n": 0}

    def cancelled():
        state["n"] += 1
        return state["n"] > 5

    def cancel():
        calls.append(1)
        session.cancel()

    done = pump(session.stream(conv, q.id), conv_id=conv.id, message_id=lambda: conv.current_leaf,
                post=posted.append, is_cancelled=cancelled, cancel=cancel, memory=session.memory)
    reply = conv.path()[-1]
    assert calls == [1] and done.stop_reason == "cancelled" and reply.status == "stopped"
    assert 0 < len(reply.content) < 99
    assert "".join(p.text for p in posted if isinstance(p, ReplyChunk)) == reply.content
    assert any(isinstance(p, MemorySample) for p in posted)


def test_pump_reports_an_error_with_the_message_it_was_writing():
    engine = FakeEngine(["a b c d"], error_after=2)
    session = Session(engine, FakeTokenizer(), fake_entry())
    conv = Conversation()
    q = conv.add(None, "user", "go")
    posted = []
    assert pump(session.stream(conv, q.id), conv_id=conv.id, message_id=lambda: conv.current_leaf,
                post=posted.append, is_cancelled=lambda: False, cancel=lambda: None) is None
    end = posted[-1]
    assert isinstance(end, ReplyFinished) and end.message_id == conv.current_leaf
    assert "RuntimeError: scripted engine failure" in end.error


def test_readme_key_table_matches_the_app():
    """The README's key table lists every binding with the app's keys and descriptions, nothing else."""
    import re
    from pathlib import Path

    from chatapp.tui.keys import SCOPES

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([^|]+) \| ([^|]+) \| ([^|]+) \| `([a-z_]+\.[a-z_]+)` \|$", readme, flags=re.M)
    table = {binding_id: (scope.strip(), keys.replace("`", "").replace(" ", ""), action.strip())
             for scope, keys, action, binding_id in rows}
    expected = {k.id: (SCOPES[k.scope].split(" (")[0], k.keys, k.description) for k in KEYS}
    assert table == expected

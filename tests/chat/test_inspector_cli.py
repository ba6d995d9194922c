"""The one-shot CLI's view of the per-token record (issue 15): --json streams one object per token,
--show-probs colours tokens on a terminal (plain text otherwise, controls stripped)."""
from __future__ import annotations

import io
import json
import math
import re

import pytest

from chatapp.cli import main
from chatapp.cli.token_view import SCALE, TokenWriter
from chatapp.contract import Done, StepEvent

ARGS = ["--model", "axiom-tiny", "--prompt", "hi", "--max-tokens", "6", "--temperature", "0"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_json_streams_one_object_per_token_then_the_end(capsys):
    assert main([*ARGS, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens, end = lines[:-1], lines[-1]
    assert end["done"] is True and end["new_tokens"] == len(tokens) > 0
    for t in tokens:
        assert set(t) == {"text", "id", "prob", "entropy", "alternatives", "steps"}
        assert 0 < t["prob"] <= 1 and t["entropy"] >= 0 and len(t["alternatives"]) == 5
        probs = [a["prob"] for a in t["alternatives"]]
        assert probs == sorted(probs, reverse=True)
        # Greedy without the card's penalties would take the top alternative; with them the chosen
        # token is still among the raw distribution's figures.
        assert t["prob"] <= probs[0] + 1e-6
    plain = main(ARGS)
    assert plain == 0 and capsys.readouterr().out == "".join(t["text"] for t in tokens) + end["text"] + "\n"


def test_show_probs_is_plain_text_when_stdout_is_not_a_terminal(capsys):
    assert main(ARGS) == 0
    plain = capsys.readouterr().out
    assert main([*ARGS, "--show-probs"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "\x1b" not in out.out


def test_show_probs_colours_each_token_by_its_probability_on_a_terminal():
    out = io.StringIO()
    out.isatty = lambda: True
    w = TokenWriter("probs", out)
    w.write(StepEvent(1, "sure", 0, logprob=math.log(0.95)))
    w.write(StepEvent(2, " unsure\x1b]0;pwned\x07\x1b[2J", 0, logprob=math.log(0.05)))
    w.write(StepEvent(3, "", 0, logprob=math.log(0.5)))  # a partial UTF-8 sequence: nothing to colour yet
    w.write(Done("eos", 1, 3, 0.0, 0.0, 0.0, text="!"))
    text = out.getvalue()
    assert text.startswith(f"\x1b[38;5;{SCALE[0][1]}msure\x1b[0m")
    assert f"\x1b[38;5;{SCALE[-1][1]}m unsure\x1b[0m" in text
    assert ANSI.sub("", text) == "sure unsure!"  # the model's own sequences are gone


def test_json_and_show_probs_need_a_prompt_and_exclude_each_other(capsys):
    assert main(["--json"]) == 2
    assert "--prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*ARGS, "--json", "--show-probs"])


def test_plain_answer_on_a_terminal_never_carries_the_models_escape_sequences():
    hostile = "hi\x1b]0;pwned\x07\x1b[2J there"
    tty = io.StringIO()
    tty.isatty = lambda: True
    pipe = io.StringIO()
    for out in (tty, pipe):
        w = TokenWriter("plain", out)
        w.write(StepEvent(1, hostile, 0))
        w.write(Done("eos", 1, 1, 0.0, 0.0, 0.0, text="\x1b[31m!"))
    assert tty.getvalue() == "hi there!"
    # A pipe is a script's: it gets the model's bytes as they are.
    assert pipe.getvalue() == hostile + "\x1b[31m!"

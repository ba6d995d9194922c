"""The engine's intra-op thread count: a default that leaves the UI a core, --threads on the chat CLI, the TUI
and serve, $SMOLLCHAT_THREADS, and the engine applying it where it loads (and recording it)."""
from __future__ import annotations

import os

import pytest

from chatapp.cli import build_parser, main
from chatapp.contract import THREADS_ENV


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 2), (3, 2), (4, 3), (16, 15)])
def test_the_default_leaves_a_core_for_the_ui_above_two_cores(cores, threads):
    from chatapp.engine.decisions import default_threads
    assert default_threads(cores) == threads


def test_the_default_counts_this_machine_s_physical_cores():
    from chatapp.engine.decisions import default_threads, physical_cores
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    assert default_threads() == default_threads(physical_cores())


def test_asked_then_environment_then_default(monkeypatch):
    from chatapp.engine.decisions import default_threads, resolve_threads
    monkeypatch.setenv(THREADS_ENV, "3")
    assert resolve_threads(5) == 5 and resolve_threads() == 3
    monkeypatch.delenv(THREADS_ENV)
    assert resolve_threads() == default_threads()
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match=r"\$SMOLLCHAT_THREADS must be a whole number of threads, not 'many'"):
        resolve_threads()
    with pytest.raises(ValueError, match="at least 1"):
        resolve_threads(0)


@pytest.mark.parametrize("argv", [["--threads", "3"], ["serve", "--threads", "3"]])
def test_chat_tui_and_serve_take_threads(argv):
    assert build_parser().parse_args(argv).threads == 3
    assert build_parser().parse_args(argv[:-2]).threads is None


@pytest.mark.parametrize("value", ["0", "two"])
def test_a_bad_thread_count_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "axiom-tiny", "--prompt", "hi", "--threads", value])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_the_engine_applies_the_count_where_it_loads(monkeypatch):
    import torch

    from chatapp.catalog import get_entry
    from chatapp.engine.loader import LoadError
    from chatapp.engine.runtime import load_engine

    before = torch.get_num_threads()
    try:
        engine = load_engine(get_entry("odinnext-tiny"), device="cpu", compile="off", threads=2)
        assert torch.get_num_threads() == 2 and engine.info()["threads"] == 2
        monkeypatch.setenv(THREADS_ENV, "1")
        assert load_engine(get_entry("odinnext-tiny"), device="cpu", compile="off").info()["threads"] == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "0")
        with pytest.raises(LoadError, match="at least 1"):
            load_engine(get_entry("odinnext-tiny"), device="cpu", compile="off")
    finally:
        torch.set_num_threads(before)


def test_the_one_shot_answer_runs_on_the_asked_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["--model", "odinnext-tiny", "--prompt", "hi", "--max-tokens", "2", "--temperature", "0",
                     "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_tui_loads_its_engines_on_the_asked_threads(monkeypatch):
    # The TUI never imports torch itself: the count rides in its load options to wherever the engine loads
    # (the engine process, or this one), and --eager asks for the reference kernels there too.
    from chatapp.tui import app, backend

    started = []
    monkeypatch.setattr(app, "make_app", lambda **kw: type("App", (), {"run": lambda self: started.append(kw)})())
    assert main(["--fake", "--threads", "3", "--eager"]) == 0
    options = started[0]["load_options"]
    assert options.threads == 3 and options.eager
    loads = []
    monkeypatch.setattr("chatapp.engine.runtime.load_engine", lambda entry, **kw: loads.append(kw))
    backend.LoadOptions(threads=3, eager=True, engine_process=False).loader()("axiom-tiny", lambda _m: None)
    assert loads[0]["threads"] == 3 and loads[0]["kernels"] == "reference"

"""The one-shot CLI answer goes through the chat Session: same prompt, settings and controls as the TUI,
nothing stored unless --save."""
from __future__ import annotations

import pytest

from chatapp.chat.store import Store
from chatapp.cli import main


def _chats():
    with Store() as store:
        return [store.load(summary.id) for summary in store.list_chats()]


def test_one_shot_answers_on_stdout_and_stores_nothing(capsys):
    assert main(["--model", "axiom-tiny", "--prompt", "hi", "--max-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n") and "random weights" in out.err
    assert _chats() == []


def test_save_keeps_the_chat_with_its_run_card(capsys):
    assert main(["--model", "huginn-tiny", "--prompt", "hi", "--max-tokens", "3", "--seed", "5",
                 "--control", "num_steps=2", "--system", "Be brief.", "--save"]) == 0
    assert "saved as chat" in capsys.readouterr().err
    (chat,) = _chats()
    user, reply = chat.path(chat.current_leaf)[-2:]
    assert (user.role, user.content, reply.role) == ("user", "hi", "assistant")
    run = reply.run
    # The full control set in force, the chat's num_steps over the catalog's defaults.
    assert run["controls"]["num_steps"] == 2 and run["controls"]["cache_strategy"] == "latest-m4"
    assert run["settings"]["max_new_tokens"] == 3 and run["seed"] == 5
    assert run["system_prompt"] == "Be brief." and run["steps"] == [2] * run["new_tokens"]


@pytest.mark.parametrize("control, words", [("nonsense=1", "unknown control 'nonsense'"),
                                            ("exit_threshold=nan", "finite"),
                                            ("exit_threshold=-0.5", "exit_threshold")])
def test_a_bad_control_is_a_usage_error(capsys, control, words):
    assert main(["--model", "huginn-tiny", "--prompt", "hi", "--control", control]) == 2
    assert words in capsys.readouterr().err

"""The chat/engine contract: one validator for controls and settings, torch-free."""
from __future__ import annotations

import subprocess
import sys

import pytest

from chatapp.contract import ControlSpec, Controls, SamplingSettings, resolve_controls

SPECS = (
    ControlSpec("num_steps", "steps", "int", 32, 1, 128),
    ControlSpec("exit_criterion", "exit", "choice", "none", choices=("none", "kl")),
    ControlSpec("exit_threshold", "threshold", "float", "auto", min=0.0),
    ControlSpec("min_steps", "min steps", "int", 0, 0, 128),
    ControlSpec("warm", "warm start", "bool", False),
    ControlSpec("draft_steps", "draft", "int", 0, 0, 128, changes_state=False),
)


def test_layers_merge_architecture_catalog_chat_call_in_that_order():
    c = resolve_controls(SPECS, catalog={"num_steps": 16, "min_steps": 2}, chat={"num_steps": "8", "warm": "on"},
                         call={"min_steps": 3})
    assert isinstance(c, Controls)
    assert dict(c) == {"num_steps": 8, "exit_criterion": "none", "exit_threshold": "auto", "min_steps": 3,
                       "warm": True, "draft_steps": 0}
    # Every control is present, converted to its type, whatever the layers set.
    assert dict(resolve_controls(SPECS)) == {s.name: s.default for s in SPECS}


def test_the_state_key_holds_only_the_controls_that_change_the_state():
    a = resolve_controls(SPECS, call={"draft_steps": 2})
    b = resolve_controls(SPECS, call={"draft_steps": 0})
    assert a.state_key == b.state_key and "draft_steps" not in dict(a.state_key)
    assert resolve_controls(SPECS, call={"num_steps": 4}).state_key != a.state_key


@pytest.mark.parametrize("call, words", [
    ({"exit_threshold": float("nan")}, "finite"),
    ({"exit_threshold": "nan"}, "finite"),
    ({"exit_threshold": float("inf")}, "finite"),
    ({"exit_threshold": -1e-3}, "within [0, ...]"),
    ({"num_steps": 0}, "within [1, 128]"),
    ({"num_steps": 2.5}, "an integer"),
    ({"num_steps": "many"}, "an integer"),
    ({"exit_criterion": "soon"}, "one of none, kl"),
    ({"warm": "perhaps"}, "true or false"),
    ({"nonsense": 1}, "unknown control 'nonsense'; this model's controls are: num_steps, exit_criterion"),
])
def test_invalid_control_values_are_refused_with_a_clear_message(call, words):
    with pytest.raises(ValueError) as e:
        resolve_controls(SPECS, call=call)
    assert words in str(e.value)


def test_a_chat_may_hold_controls_another_model_declares_but_their_values_are_checked():
    assert "other" not in resolve_controls(SPECS, catalog={"other": 1}, chat={"other": 1})
    with pytest.raises(ValueError, match="num_steps"):
        resolve_controls(SPECS, chat={"num_steps": 1000})


@pytest.mark.parametrize("bad, words", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_p": float("inf")}, "top_p must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"seed": 2**64}, "seed must be an integer in [0, 2**64)"),
    ({"seed": -1}, "seed must be an integer in [0, 2**64)"),
])
def test_invalid_sampling_settings_are_refused(bad, words):
    with pytest.raises(ValueError) as e:
        SamplingSettings().with_overrides(**bad).validate()
    assert words in str(e.value)


def test_the_contract_and_the_catalog_import_no_torch_and_no_engine():
    code = ("import sys, chatapp.contract, chatapp.catalog; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('chatapp.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_architectures_own_rule_is_part_of_the_one_validator_and_resolved_controls_pass_through():
    def ring(value):
        if value.startswith("ring-") and int(value[5:]) < 1:
            raise ValueError("a ring needs at least one slot")

    specs = (*SPECS, ControlSpec("cache", "cache", "choice", "full", choices=("full", "ring-*"), check=ring))
    with pytest.raises(ValueError, match="control 'cache': a ring needs at least one slot"):
        resolve_controls(specs, call={"cache": "ring-0"})
    c = resolve_controls(specs, catalog={"num_steps": 4}, call={"cache": "ring-8"})
    # A model's forward gets the call's Controls: validated once, passed through as they are.
    assert resolve_controls(specs, call=c) is c and c.specs is specs
    assert dict(resolve_controls(specs, chat=c, call={"min_steps": 1})) == {**c, "min_steps": 1}

"""Snapshot tests (pytest-textual-snapshot) of the token inspector: 80x24 and 160x40, in smoll-light and
smoll-dark, on the FakeEngine with fixed per-token probabilities. Update with `--snapshot-update` only
after reading the diff report."""
from __future__ import annotations

import math

import pytest

from chatapp.chat.fake import FakeEngine
from chatapp.tui import streaming

from .conftest import send, still, wait_until

REPLY = ("Its state is a fixed-size matrix per layer, so memory stays flat while a KV cache grows with "
         "every token.\n\nThat is why the memory panel draws a flat line.")
#: Chosen-token probabilities, cycled: mostly sure, sometimes not (every colour level appears).
PROBS = (0.98, 0.91, 0.66, 0.99, 0.42, 0.95, 0.17, 0.99, 0.74, 0.06, 0.93, 0.85)


@pytest.fixture(autouse=True)
def one_batch(monkeypatch):
    monkeypatch.setenv("SMOLLCHAT_HOME", "/tmp/smollchat-snapshots")
    monkeypatch.setattr(streaming, "BATCH_S", 60.0)  # one batch per reply, whatever the load


@pytest.mark.parametrize("size", [(80, 24), (160, 40)], ids=["80x24", "160x40"])
@pytest.mark.parametrize("theme", ["smoll-light", "smoll-dark"])
def test_inspector_on_a_reply(build, snap_compare, size, theme):
    """You should see the reply token by token, coloured from sure (green) to unsure (red, underlined;
    ↵ marks a newline, ⏎ the end of turn), the cursor (reversed) on the second token under 30%,
    ' memory'; under the list the panel: the legend 'probability (raw): ■≥90% ■≥60% ■≥30% ■≥10% ■<10%'
    in the five inks, 'token 10/31 ␣memory  p 6.0% · H 2.00 nats', and five alternatives, the chosen one
    marked and the third picked (▸); the footer starts with Next unsure, Branch here, Type instead."""
    app = build(FakeEngine([REPLY], logprobs=[math.log(p) for p in PROBS]))

    async def run_before(pilot):
        pilot.app.theme = theme
        await send(pilot, "Why does a recurrent model keep constant memory?")
        await pilot.press("alt+up", "t")
        await wait_until(pilot, lambda: pilot.app.chat_screen.inspector.current is not None)
        await pilot.press("n", "n", "down")
        still(pilot.app)
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=run_before)

"""The live reply's frame pacing (widgets/live.py FramePacer), on a fake wall clock and a fake CPU clock: a cheap
paint is followed by the next one at once (within a frame), a costly one keeps painting at its share of the UI
thread, and no paint waits longer than the cap."""
from __future__ import annotations

import pytest

from chatapp.tui.widgets.live import FramePacer


class Clocks:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0

    def pacer(self, busy: float = 0.35, min_s: float = 0.02, max_s: float = 0.5) -> FramePacer:
        return FramePacer(busy, min_s, max_s, clock=lambda: self.wall, cpu=lambda: self.cpu)

    def paint(self, pacer: FramePacer, cost: float) -> None:
        """A paint that keeps the UI thread busy for `cost` seconds (its layout and drawing included)."""
        pacer.painting()
        self.wall += cost
        self.cpu += cost
        pacer.painted()


def run(clocks: Clocks, pacer: FramePacer, costs: list[float], arrival_s: float = 0.001) -> list[float]:
    """Text arrives every `arrival_s`; paint as soon as the pacer allows. Returns when each paint started."""
    starts = []
    for cost in costs:
        wait = pacer.delay()
        clocks.wall += max(wait, arrival_s)
        starts.append(clocks.wall)
        clocks.paint(pacer, cost)
    return starts


def test_the_first_paint_needs_no_wait():
    clocks = Clocks()
    assert clocks.pacer().delay() == 0.0


def test_cheap_paints_follow_the_text_every_shortest_frame():
    clocks = Clocks()
    pacer = clocks.pacer()
    starts = run(clocks, pacer, [0.002] * 20)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) == pytest.approx(0.02)


def test_after_a_costly_paint_the_next_cheap_one_brings_the_pace_back_at_once():
    clocks = Clocks()
    pacer = clocks.pacer()
    run(clocks, pacer, [0.3])  # e.g. the first paint of a reply mounts its view
    assert pacer.interval == pytest.approx(0.5)  # capped
    run(clocks, pacer, [0.001])
    assert pacer.interval == pytest.approx(0.02)
    assert pacer.delay() == pytest.approx(0.02 - 0.001)


@pytest.mark.parametrize("busy", [0.35, 0.7])
@pytest.mark.parametrize("cost", [0.01, 0.05, 0.1])
def test_painting_keeps_the_ui_thread_about_its_share_busy(busy, cost):
    clocks = Clocks()
    pacer = clocks.pacer(busy=busy)
    cpu0, wall0 = clocks.cpu, clocks.wall
    starts = run(clocks, pacer, [cost] * 50)
    share = (clocks.cpu - cpu0) / (clocks.wall - wall0)
    assert share <= busy + 0.02
    # ...and no slower than that share or the shortest frame allow (plus the 1 ms between arrivals).
    gap = max(cost / busy, 0.02)
    assert max(b - a for a, b in zip(starts[1:], starts[2:])) <= gap + 0.0011


def test_however_costly_a_paint_the_next_starts_within_the_cap():
    clocks = Clocks()
    pacer = clocks.pacer()
    starts = run(clocks, pacer, [0.3, 0.3, 0.3])  # 0.3 s at a 0.35 share would ask for 0.86 s between paints
    assert [b - a for a, b in zip(starts, starts[1:])] == pytest.approx([0.5, 0.5])

"""The executor's nap between a step's layers (engine/layer_pacer.py), on a simulated clock:
each receive advances the clock by the time the next layer's inputs took to arrive."""

from __future__ import annotations

import pytest

from adrenaline.engine.layer_pacer import FRACTION, MAX_NAP_S, LayerPacer


class Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def _gap(pacer: LayerPacer, clock: Clock, arrives_after_s: float) -> float:
    """One wait for inputs that arrive ``arrives_after_s`` after the previous answer;
    returns how late the pacer saw them (0: on arrival)."""
    start = clock.now
    seen = []

    def receive():
        clock.now = max(clock.now, start + arrives_after_s) + 5e-6
        seen.append(clock.now - (start + arrives_after_s))

    pacer.wait(receive)
    return seen[0]


def test_it_learns_the_gap_and_naps_through_most_of_it():
    clock = Clock()
    pacer = LayerPacer(clock=clock, sleep=clock.sleep)
    assert _gap(pacer, clock, 3e-3) == pytest.approx(5e-6)  # first gap: no nap, polled
    assert clock.sleeps == []
    assert pacer.nap_s == pytest.approx(FRACTION * 3e-3, rel=1e-2)
    for _ in range(5):  # steady layers: nap, then poll the rest; never late
        assert _gap(pacer, clock, 3e-3) == pytest.approx(5e-6)
    assert clock.sleeps == [pytest.approx(FRACTION * 3e-3, rel=1e-2)] * 5
    assert pacer.napped_s == pytest.approx(5 * FRACTION * 3e-3, rel=1e-2)
    assert pacer.num_early == 0


def test_a_nap_that_overshoots_is_halved_then_relearnt():
    clock = Clock()
    pacer = LayerPacer(clock=clock, sleep=clock.sleep)
    _gap(pacer, clock, 4e-3)
    _gap(pacer, clock, 4e-3)
    assert pacer.nap_s == pytest.approx(2.8e-3, rel=1e-2)
    # the decode's layers got shorter (a smaller batch): the inputs wait for the nap's end
    late = _gap(pacer, clock, 1e-3)
    assert late == pytest.approx(1.8e-3, rel=1e-2)
    assert pacer.num_early == 1
    assert pacer.nap_s == pytest.approx(1.4e-3, rel=1e-2)  # halved
    late = _gap(pacer, clock, 1e-3)  # still over: halved again
    assert pacer.num_early == 2 and pacer.nap_s == pytest.approx(0.7e-3, rel=1e-2)
    _gap(pacer, clock, 1e-3)  # now polled on arrival: the gap is learnt again
    assert pacer.nap_s == pytest.approx(FRACTION * 1e-3, rel=1e-2)
    assert _gap(pacer, clock, 1e-3) == pytest.approx(5e-6)


def test_idle_gaps_are_not_learnt_and_naps_are_capped():
    clock = Clock()
    pacer = LayerPacer(clock=clock, sleep=clock.sleep)
    _gap(pacer, clock, 2e-3)
    before = pacer.nap_s
    _gap(pacer, clock, 5.0)  # the decode idled between steps: not a layer's gap
    assert pacer.nap_s == before
    _gap(pacer, clock, 0.9 * MAX_NAP_S)
    assert pacer.nap_s == pytest.approx(FRACTION * 0.9 * MAX_NAP_S, rel=1e-2)
    assert max(clock.sleeps) <= MAX_NAP_S


def test_naps_too_short_to_pay_are_not_taken():
    clock = Clock()
    pacer = LayerPacer(clock=clock, sleep=clock.sleep)
    for _ in range(3):
        _gap(pacer, clock, 50e-6)  # 35 us naps: below a sleep's own overshoot
    assert clock.sleeps == [] and pacer.napped_s == 0.0

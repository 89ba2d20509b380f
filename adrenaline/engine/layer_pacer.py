"""How long an attention executor naps between a decode step's layers before it polls.

Within a step the executor answers layer l, then waits for layer l+1's q, k, v while the
decode instance finishes layer l and computes the next projections. Polling that whole
gap holds the executor's core, which it shares with the prefill worker and, unpinned, the
serving path (router, proxy): tokens then reach clients late and in bursts. Sleeping on
the doorbell instead pays a sleeping thread's wake-up on every layer.

A LayerPacer naps through most of the expected gap and leaves the rest to polling:

- after a gap in which the q, k, v arrived while it polled (so the gap was observed
  exactly), the next nap is ``FRACTION`` of that gap;
- after a nap that ended with them already there (the nap may have been too long, so the
  decode waited), the next nap is half as long;
- the nap never exceeds ``MAX_NAP_S``, and gaps longer than that (an idle decode) are not
  learnt from.

Layers of one step take about the same time and a step's batch changes slowly, so the
last observed gap predicts the next. The pacer only decides when to start polling: the
wait itself and its failure handling are the communicator's.
"""

from __future__ import annotations

import time
from typing import Callable

FRACTION = 0.7  # of the last observed gap: nap this long, poll the rest
MAX_NAP_S = 20e-3  # no nap longer than this; longer gaps (an idle decode) are not learnt
MIN_NAP_S = 100e-6  # shorter naps are not taken (a sleep's own overshoot is about this)
ALREADY_THERE_S = 50e-6  # a receive this quick after the nap found its data waiting


class LayerPacer:
    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep):
        self._clock = clock
        self._sleep = sleep
        self.nap_s = 0.0  # the next nap
        self.napped_s = 0.0  # total time napped (the core given back)
        self.num_early = 0  # naps that ended with the data already there

    def wait(self, receive: Callable[[], None]) -> None:
        """Nap, then ``receive()`` (a blocking receive of the next layer's inputs).

        The gap is timed from this call, which the caller makes right after it answered
        the previous layer.
        """
        start = self._clock()
        nap = self.nap_s if self.nap_s >= MIN_NAP_S else 0.0
        if nap:
            self._sleep(nap)
        woke = self._clock()
        self.napped_s += woke - start
        receive()
        end = self._clock()
        self.observe(end - start, end - woke if nap else None)

    def observe(self, gap_s: float, after_nap_s: float | None) -> None:
        """Learn from one gap: its length, and how long the receive took after a nap
        (None: no nap was taken)."""
        if after_nap_s is not None and after_nap_s < ALREADY_THERE_S:
            self.num_early += 1
            self.nap_s /= 2
        elif gap_s <= MAX_NAP_S:
            self.nap_s = min(FRACTION * gap_s, MAX_NAP_S)

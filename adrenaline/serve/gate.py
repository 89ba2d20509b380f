"""The ingress's own admission gate: load is refused here, cheaply, before any heavy work.

The ingress counts the generation requests it holds (from arrival until the response
ends) and answers the OpenAI-style 429 with Retry-After at once beyond
``limits.max_ongoing_requests``, before reading the body, parsing or tokenizing. So a
burst never piles up behind the router, and Serve's own queues in front of the ingress
(sized by ``limits.max_http_requests``, far above the generation limits) stay a backstop
that a burst the machine can take never reaches. The router still applies its limits
(``serve/admission.py``: ``max_queued_requests`` too), also with 429.
"""

from __future__ import annotations

from adrenaline.app_config import LimitsConfig
from adrenaline.serve.openai_api.errors import overloaded


class Slot:
    """One admitted request's place at the gate; ``release`` is idempotent."""

    def __init__(self, gate: "IngressGate"):
        self._gate = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.num_held -= 1
            self._gate = None


class IngressGate:
    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.num_held = 0  # generation requests held by this ingress replica now
        self.num_refused = 0

    def enter(self) -> Slot:
        """A slot, or the 429 APIError (with Retry-After) when the ingress is full."""
        lim = self.limits
        if self.num_held >= lim.max_ongoing_requests:
            self.num_refused += 1
            raise overloaded(f"the server is overloaded: {self.num_held} requests in flight "
                             f"(limit {lim.max_ongoing_requests}); retry later",
                             lim.retry_after_s)
        self.num_held += 1
        return Slot(self)

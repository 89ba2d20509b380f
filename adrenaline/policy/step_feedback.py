"""A decode instance's served steps against the start-up profile's step model.

The profile (policy/profile.py) times an idle engine, so its step model leaves out what
a served step also pays: the wait on executors, a core shared with the serving
processes, the host's noise. Load-aware's TPOT bound (B_max) is only as good as that
model. ``StepFeedback`` compares each decode instance's served steps with the model at
the same mean batch and local KV, over the steps since its previous observation, and
keeps the ratio as an exponential average: ``scale[d] x step_s(...)`` is the step that
instance serves now. The router feeds it the decode workers' cumulative counters (each
heartbeat); the simulator feeds it its own.
"""

from __future__ import annotations

from adrenaline.policy.profile import ClusterProfile

MIN_STEPS = 8  # steps between two observations that count: fewer say too little
WEIGHT = 0.3  # of the newest ratio in the average
BOUNDS = (0.5, 4.0)  # a ratio outside them is a fault in the counters, not the step


class StepFeedback:
    def __init__(self, profile: ClusterProfile, num_decode: int):
        self.profile = profile
        self.scale = [1.0] * num_decode  # 1.0 until an instance's steps were measured
        self._last: list[tuple[int, float, int, int] | None] = [None] * num_decode
        self._measured = [False] * num_decode

    def observe(self, decode: int, num_steps: int, step_time_s: float, batch_size_sum: int,
                local_kv_tokens_sum: int) -> None:
        """Cumulative counters of decode instance ``decode`` (steps, seconds in them, sum of
        their batches and of the KV tokens their local attention read)."""
        now = (num_steps, step_time_s, batch_size_sum, local_kv_tokens_sum)
        last = self._last[decode]
        if last is None or num_steps < last[0]:  # first sight, or a replaced worker's
            self._last[decode] = now
            return
        steps = num_steps - last[0]
        if steps < MIN_STEPS:
            return
        self._last[decode] = now
        measured = (step_time_s - last[1]) / steps
        modeled = self.profile.step_s((batch_size_sum - last[2]) / steps,
                                      (local_kv_tokens_sum - last[3]) / steps, decode)
        if modeled <= 0:
            return
        ratio = min(max(measured / modeled, BOUNDS[0]), BOUNDS[1])
        if self._measured[decode]:
            self.scale[decode] += WEIGHT * (ratio - self.scale[decode])
        else:
            self.scale[decode], self._measured[decode] = ratio, True

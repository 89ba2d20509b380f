"""Pinning an actor process to a CPU set of its own (``prefill.cpus``, ``decode.cpus``).

On CPU the roles stand for devices of their own: a decode instance on its
cores, a prefill instance and its attention executor on theirs. Pinning is
what makes that true on one machine; unpinned, every role floats over every
core and the executor competes with the decode worker it is meant to relieve.

Linux affinity is per thread, so every thread the process has when it pins
is moved; threads started later (the engine thread, torch's pool) inherit it.
"""

from __future__ import annotations

import os

from adrenaline.config import ConfigError


def pin_process(cpus: list[int] | None, field: str) -> None:
    """Run this process (all its threads) on ``cpus`` only; None leaves it unpinned.

    A core this node does not offer is a ConfigError naming ``field``.
    """
    if cpus is None:
        return
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise ConfigError(f"{field}: core(s) {missing} do not exist on this node "
                          f"(it offers {sorted(allowed)})")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cpus))
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


def thread_budget(num_threads: int | None, cpus: list[int] | None) -> int:
    """Torch threads for a role: its engine's ``num_threads``, else one per pinned core, else 1."""
    return num_threads or (len(cpus) if cpus else 1)

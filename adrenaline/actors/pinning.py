"""Pinning an actor process to a CPU set of its own (``prefill.cpus``, ``decode.cpus``).

On CPU the roles stand for devices of their own: a decode instance on its
cores, a prefill instance and its attention executor on theirs. Pinning is
what makes that true on one machine; unpinned, every role floats over every
core and the executor competes with the decode worker it is meant to relieve.

Linux affinity is per thread, so every thread the process has when it pins
is moved; threads started later (the engine thread, torch's pool) inherit it.
Niceness is per thread on Linux too, and inherited the same way.
"""

from __future__ import annotations

import logging
import os

from adrenaline.config import ConfigError

log = logging.getLogger(__name__)


def pin_process(cpus: list[int] | None, field: str, nice: int | None = None) -> None:
    """Run this process (all its threads) on ``cpus`` only, at niceness ``nice``; None
    leaves either unchanged.

    A core this node does not offer is a ConfigError naming ``field``.
    """
    if nice is not None:
        _renice(nice)
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


def _renice(nice: int) -> None:
    """Every thread of this process at niceness ``nice`` (a warning where not permitted)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:  # a thread that just ended
            pass
        except PermissionError:
            log.warning("nice %d: not permitted here (needs CAP_SYS_NICE); left at %d",
                        nice, os.getpriority(os.PRIO_PROCESS, 0))
            return

"""The KV invariant check every integration scenario ends with (see engine/kv_audit.py)."""

from __future__ import annotations

import time


def kv_problems(reports, idle: bool) -> list[str]:
    """Problems in a cluster's KV reports; ``idle``: no request may hold pages at all."""
    out = [f"{r.role}[{r.index}]: {p}" for r in reports for p in r.problems]
    if idle:
        out += [f"{r.role}[{r.index}]: {r.num_used} page(s) held while idle: {r.owners}"
                for r in reports if r.num_used]
    return out


def assert_kv_sound(router, idle: bool = True, timeout_s: float = 30.0) -> list:
    """Run the router's check_kv (sync handle) until it passes or ``timeout_s`` runs out.

    Pages are freed asynchronously (a cancelled request's cleanup runs detached), so
    an idle cluster may need a few steps to get there; corruption never heals.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        reports = router.check_kv.remote().result()
        problems = kv_problems(reports, idle)
        if not problems:
            return reports
        if time.monotonic() > deadline:
            raise AssertionError("KV invariant violated:\n" + "\n".join(problems))
        time.sleep(0.2)


async def assert_kv_sound_async(router, idle: bool = True, timeout_s: float = 30.0) -> list:
    """``assert_kv_sound`` for an async handle (or a Client: its ``check_kv``)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        reports = await router.check_kv()
        problems = kv_problems(reports, idle)
        if not problems:
            return reports
        if time.monotonic() > deadline:
            raise AssertionError("KV invariant violated:\n" + "\n".join(problems))
        await asyncio.sleep(0.2)

"""audit_kv reports leaks, missing pages and corrupt accounting, and nothing when sound."""

from __future__ import annotations

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.kv_audit import audit_kv


def test_sound_accounting_has_no_problems():
    bm = BlockManager(8, 4)
    bm.allocate("a", 5)
    r = audit_kv("decode", 0, bm, live={"a"}, must_own={"a"})
    assert r.ok and r.owners == {"a": 2} and r.num_used == 2 and r.num_free == 6


def test_page_owned_by_dead_request_is_a_leak():
    bm = BlockManager(8, 4)
    bm.allocate("gone", 3)
    r = audit_kv("executor", 1, bm, live=set())
    assert not r.ok and "'gone'" in r.problems[0] and "not a live request" in r.problems[0]


def test_live_request_without_pages_is_reported():
    r = audit_kv("prefill", 0, BlockManager(4, 4), live={"held"}, must_own={"held"})
    assert r.problems == ["live request 'held' holds no pages"]


def test_double_ownership_is_reported():
    bm = BlockManager(4, 4)
    bm.allocate("a", 4)
    bm._free.append(bm.block_table("a")[0])  # corrupt: a page both owned and free
    r = audit_kv("decode", 0, bm, live={"a"})
    assert any("corrupt" in p for p in r.problems)

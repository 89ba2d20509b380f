"""Scheduler decisions with exact block ids (no model: the engine's steps are simulated)."""

from __future__ import annotations

from adrenaline.engine.block_manager import BlockManager
from adrenaline.engine.request import Request, RequestStatus
from adrenaline.engine.scheduler import Scheduler
from adrenaline.sampling_params import SamplingParams


def _req(i: int, n: int, max_tokens: int = 100) -> Request:
    return Request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), arrival=i)


def _finish_step(sched: Scheduler, plan) -> None:
    """What the engine does after a step: every request gets one token."""
    for r in plan.requests:
        r.num_computed = r.num_tokens
        r.append_token(7)


def test_prefill_budget_and_fcfs():
    bm = BlockManager(num_blocks=16, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    reqs = [_req(0, 6), _req(1, 4), _req(2, 3)]
    for r in reqs:
        s.add(r)
    plan = s.schedule()
    assert plan.is_prefill and [r.request_id for r in plan.requests] == ["r0", "r1"]
    assert plan.query_lens == [6, 4] and plan.context_lens == [0, 0]
    assert bm.block_table("r0") == [0, 1] and bm.block_table("r1") == [2]
    _finish_step(s, plan)
    plan = s.schedule()  # r2 still waiting: prefill goes first
    assert plan.is_prefill and [r.request_id for r in plan.requests] == ["r2"]
    assert bm.block_table("r2") == [3]
    _finish_step(s, plan)
    plan = s.schedule()
    assert not plan.is_prefill and [r.request_id for r in plan.requests] == ["r0", "r1", "r2"]
    assert plan.context_lens == [6, 4, 3] and plan.query_lens == [1, 1, 1]
    # r1 now writes its 5th token: it needs a second block.
    assert bm.block_table("r1") == [2, 4]


def test_long_prompt_runs_alone_past_budget():
    bm = BlockManager(num_blocks=16, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4)
    s.add(_req(0, 9))
    s.add(_req(1, 2))
    plan = s.schedule()
    assert [r.request_id for r in plan.requests] == ["r0"]


def test_decode_preempts_newest_and_requeues_in_order():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _req(0, 8), _req(1, 8)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert bm.block_table("r0") == [0, 1] and bm.block_table("r1") == [2, 3]
    _finish_step(s, plan)  # both now have 9 tokens: each needs a third block, none free
    plan = s.schedule()
    assert not plan.is_prefill
    assert [r.request_id for r in plan.requests] == ["r0"]
    assert [r.request_id for r in plan.preempted] == ["r1"]
    assert b.status is RequestStatus.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert bm.block_table("r0") == [0, 1, 2] and not bm.has("r1")
    assert list(s.waiting) == [b]
    s.finish(a)
    assert bm.num_free_blocks == 4
    plan = s.schedule()  # b is prefilled again over all 9 of its tokens
    assert plan.is_prefill and plan.requests == [b] and plan.query_lens == [9]
    s.finish(b)
    bm.check_invariants()
    assert bm.num_free_blocks == 4 and not s.has_unfinished


def test_max_num_seqs_caps_admission():
    bm = BlockManager(num_blocks=64, block_size=4)
    s = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        s.add(_req(i, 2))
    plan = s.schedule()
    assert len(plan.requests) == 2 and len(s.waiting) == 1

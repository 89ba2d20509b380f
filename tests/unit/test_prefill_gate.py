"""The prefill gate (policy/prefill_gate.py) and its ledger in the router's admission
(serve/admission.py): requests pass in arrival order only while the policy would admit
them with those gated through counted, and every path takes back what it counted."""

from __future__ import annotations

import asyncio

import pytest

from adrenaline import SamplingParams
from adrenaline.app_config import LimitsConfig
from adrenaline.policy import Placement, make_policy
from adrenaline.policy.load import admitted, new_cluster_load, placed, released
from adrenaline.policy.prefill_gate import GateEntry, GateState, PrefillGate
from adrenaline.protocol import GenerateRequest
from adrenaline.serve.admission import Admission

WHERE = Placement(0, 0)


def _req(i: int, tokens: int = 40) -> GenerateRequest:
    return GenerateRequest(request_id=f"r{i}", prompt_token_ids=[1] * (tokens // 2),
                           params=SamplingParams(max_tokens=tokens - tokens // 2))


def _zero(load) -> bool:
    return all(not any(getattr(load, f)) for f in
               ("prefill_inflight", "decode_active", "decode_reserved_tokens",
                "decode_pending_tokens", "executor_active", "executor_reserved_tokens",
                "decode_mean_tokens", "executor_mean_tokens"))


def _entry(load, i: int, tokens: int = 40) -> GateEntry:
    placed(load, WHERE, tokens)
    return GateEntry(_req(i, tokens), WHERE, load, tokens, tokens // 2)


def test_gated_through_requests_count_so_a_burst_cannot_all_pass():
    # Decode holds 100 tokens: two requests of 40 pass, the third waits although, with
    # nothing admitted yet, the policy alone would admit each of the three.
    policy, load = make_policy("least_loaded"), new_cluster_load(1, [100], [])
    gate = PrefillGate(policy)
    es = [_entry(load, i) for i in range(3)]
    assert all(policy.admit(e.req, WHERE, load) is not None for e in es)
    assert [gate.enter(e) for e in es] == [True, True, False]
    assert load.decode_reserved_tokens == [80] and load.decode_pending_tokens == [40]
    assert gate.num_passed == 2 and gate.num_queued == 1
    # Arrival order: a small one that would fit waits behind the head.
    small = _entry(load, 3, 10)
    assert not gate.enter(small) and gate.num_queued == 2
    # The first is admitted after its prefill (reservation taken back, asked again).
    assert gate.take(es[0]) and load.decode_reserved_tokens == [40]
    assert policy.admit(es[0].req, WHERE, load) == WHERE
    admitted(load, WHERE, 40, 20)
    assert gate.pump() == []  # nothing freed yet: the third still does not fit
    released(load, WHERE, WHERE, 40, 20)  # the first finishes
    assert gate.pump() == [es[2], small]
    assert load.decode_reserved_tokens == [90] and load.decode_pending_tokens == [0]
    for e in (es[1], es[2], small):  # each ends before its admission: all taken back
        gate.leave(e)
        released(load, WHERE, None, e.reserved, e.mean)
    assert gate.num_passed == 0 and gate.num_queued == 0
    assert all(e.state is GateState.LEFT for e in (es[1], es[2], small))
    load.prefill_inflight = [0]  # (their prefills are not the gate's to count)
    assert _zero(load)


def test_leaving_the_queue_counts_nothing_and_the_head_unblocks_the_rest():
    policy, load = make_policy("least_loaded"), new_cluster_load(1, [100], [])
    gate = PrefillGate(policy)
    big, first, second = _entry(load, 0, 100), _entry(load, 1, 90), _entry(load, 2, 10)
    assert gate.enter(big) and not gate.enter(first) and not gate.enter(second)
    assert not gate.leave(second)  # not the head: frees nothing
    assert gate.leave(first)  # the head: those behind it may pass now
    assert gate.pump() == [] and gate.num_queued == 0
    assert gate.leave(big)  # passed, never admitted: its reservation is freed
    for e in (big, first, second):
        released(load, WHERE, None, e.reserved, e.mean)
    load.prefill_inflight = [0]
    assert _zero(load)


def test_offloaded_decisions_are_reserved_on_the_executor():
    # static ratio 1: every request is placed for offload and admitted where its executor
    # has room; the gate holds that room.
    policy, load = make_policy("static", {"ratio": 1.0}), new_cluster_load(1, [100], [80])
    gate = PrefillGate(policy)
    where = policy.place(_req(0), load)
    es = []
    for i in range(3):
        placed(load, where, 40)
        es.append(GateEntry(_req(i), where, load, 40, 20))
    assert [gate.enter(e) for e in es] == [True, True, False]
    assert load.executor_reserved_tokens == [80] and load.decode_reserved_tokens == [0]
    assert all(e.decision.offload for e in es[:2])


def test_admission_ledger_with_the_gate_returns_to_zero_on_every_path():
    """Through the router's Admission: a client gone while gated (queued or passed) leaves
    nothing counted, a passed one is admitted as without the gate, and freed capacity
    wakes a parked request before the gate lets the next one through."""
    policy = make_policy("least_loaded")

    async def run() -> None:
        adm = Admission(LimitsConfig(prefill_when_admissible=True), policy)
        load = new_cluster_load(1, [100], [])

        def enter(i: int, tokens: int = 40) -> GateEntry:
            adm.placed(load, WHERE, tokens)
            return adm.enter_gate(_req(i, tokens), WHERE, load, tokens, tokens // 2)

        a, b, c = enter(0), enter(1), enter(2)
        assert a.waiter.done() and b.waiter.done() and not c.waiter.done()
        # c's client goes away while queued: nothing of it stays counted.
        adm.prefilled(load, WHERE)
        adm.ended(load, WHERE, 40, 20, admitted=False, offload=False, gate=c)
        assert load.decode_pending_tokens == [0] and adm.gate.num_queued == 0
        # b's client goes away after passing: its reservation goes back.
        adm.prefilled(load, WHERE)
        adm.ended(load, WHERE, 40, 20, admitted=False, offload=False, gate=b)
        assert load.decode_reserved_tokens == [40] and adm.num_queued == 1
        # a is prefilled and admitted (its reservation taken back, the policy asked again).
        adm.prefilled(load, WHERE)
        decision = await adm.wait(policy, a.req, WHERE, load, lambda: True, a)
        assert decision == WHERE and a.state is GateState.TAKEN
        adm.admitted(load, WHERE, 40, 20, False)
        assert load.decode_reserved_tokens == [40] and load.decode_pending_tokens == [0]
        # The fallback: a prefilled request the policy refuses parks; freed capacity wakes
        # it before the gate passes a later arrival that would take the same room.
        adm.placed(load, WHERE, 70)  # (parked: placed, prefilled, not admitted)
        adm.prefilled(load, WHERE)
        async def park_then_admit() -> Placement:  # as the router's _admit: one task
            decision = await adm.wait(policy, _req(3, 70), WHERE, load, lambda: True)
            adm.admitted(load, WHERE, 70, 35, False)
            return decision

        parked = asyncio.ensure_future(park_then_admit())
        await asyncio.sleep(0)
        assert not parked.done()
        d = enter(4, 70)
        assert not d.waiter.done()
        adm.ended(load, WHERE, 40, 20, admitted=True, offload=False, gate=a)  # a finishes
        assert await parked == WHERE
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not d.waiter.done() and d.state is GateState.QUEUED
        adm.ended(load, WHERE, 70, 35, admitted=True, offload=False)  # the parked one ends
        await asyncio.wait_for(d.waiter, 1.0)
        adm.prefilled(load, WHERE)
        adm.ended(load, WHERE, 70, 35, admitted=False, offload=False, gate=d)
        assert _zero(load) and adm.num_queued == 0
        assert adm.gate.num_passed == 0 and adm.gate.num_queued == 0

    asyncio.run(run())


@pytest.mark.parametrize("on", [False, True])
def test_the_gate_is_off_by_default(on):
    adm = Admission(LimitsConfig(prefill_when_admissible=on), make_policy("least_loaded"))
    assert (adm.gate is not None) == on
    assert LimitsConfig().prefill_when_admissible is False

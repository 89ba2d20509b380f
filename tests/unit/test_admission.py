"""The router's admission ledger (serve/admission.py): limits refuse at once, and every
attempt takes back exactly what it counted in the cluster load, admitted or not."""

from __future__ import annotations

import asyncio

import pytest

from adrenaline import SamplingParams
from adrenaline.app_config import LimitsConfig
from adrenaline.errors import OverloadedError
from adrenaline.policy import ClusterLoad, Placement, make_policy
from adrenaline.protocol import GenerateRequest
from adrenaline.serve.admission import Admission
from adrenaline.serve.recovery import Restart


def _load() -> ClusterLoad:
    return ClusterLoad(prefill_inflight=[0], decode_active=[0], decode_reserved_tokens=[0],
                       decode_capacity_tokens=[100], decode_pending_tokens=[0],
                       executor_active=[0], executor_reserved_tokens=[0],
                       executor_capacity_tokens=[100], decode_mean_tokens=[0],
                       executor_mean_tokens=[0])


def _zero(load: ClusterLoad) -> bool:
    return all(not any(getattr(load, f)) for f in
               ("prefill_inflight", "decode_active", "decode_reserved_tokens",
                "decode_pending_tokens", "executor_active", "executor_reserved_tokens",
                "decode_mean_tokens", "executor_mean_tokens"))


@pytest.mark.parametrize("offload", [False, True])
def test_ledger_returns_to_zero_admitted_or_not(offload):
    adm, load, where = Admission(LimitsConfig()), _load(), Placement(0, 0)
    adm.placed(load, where, 30)
    assert load.prefill_inflight == [1] and load.decode_pending_tokens == [30]
    adm.prefilled(load, where)
    adm.admitted(load, where, 30, 20, offload)
    assert adm.num_queued == 0 and load.decode_pending_tokens == [0]
    assert (load.executor_reserved_tokens if offload else load.decode_reserved_tokens) == [30]
    adm.ended(load, where, 30, 20, admitted=True, offload=offload)
    assert _zero(load) and adm.num_queued == 0
    adm.placed(load, where, 30)  # cancelled before admission
    adm.prefilled(load, where)
    adm.ended(load, where, 30, 20, admitted=False, offload=False)
    assert _zero(load) and adm.num_queued == 0


def test_limits_refuse_at_once_and_count_refusals():
    adm = Admission(LimitsConfig(max_ongoing_requests=2, max_queued_requests=1))
    adm.refuse_if_overloaded()
    adm.placed(_load(), Placement(0, 0), 10)  # one queued: the queue limit is reached
    with pytest.raises(OverloadedError):
        adm.refuse_if_overloaded()
    assert adm.num_refused == 1


def test_waiter_wakes_when_capacity_frees_and_restarts_on_a_lost_cluster():
    policy = make_policy("least_loaded")
    req = GenerateRequest(request_id="r", prompt_token_ids=[1] * 50,
                          params=SamplingParams(max_tokens=50))  # 100 tokens: fills decode
    where = Placement(0, 0)

    async def run() -> None:
        adm, load = Admission(LimitsConfig()), _load()
        load.decode_reserved_tokens[0] = 100  # full: the request must wait
        current = True
        waiting = asyncio.create_task(adm.wait(policy, req, where, load, lambda: current))
        await asyncio.sleep(0)
        assert not waiting.done()
        load.decode_reserved_tokens[0] = 0
        adm.capacity_freed()
        assert (await waiting).decode == 0
        load.decode_reserved_tokens[0] = 100
        waiting = asyncio.create_task(adm.wait(policy, req, where, load, lambda: current))
        await asyncio.sleep(0)
        current = False
        adm.capacity_freed()
        with pytest.raises(Restart):
            await waiting

    asyncio.run(run())


def test_capacity_counts_whole_kv_blocks():
    # A decode pool of 4 blocks of 16 tokens. Requests of 17 tokens take 2 blocks each, so
    # the pool holds two of them although three (51 tokens) are fewer than its 64 tokens:
    # counting raw tokens would admit a third, and the engine would then preempt one.
    from adrenaline.policy.load import admitted, new_cluster_load, placed, released

    load, where = new_cluster_load(1, [64], [64], block_size=16), Placement(0, 0)
    for _ in range(2):
        assert load.decode_fits(0, 17)
        placed(load, where, 17)
        admitted(load, where, 17, 9)
    assert load.decode_reserved_tokens == [64] and load.decode_pending_tokens == [0]
    assert not load.decode_fits(0, 17) and not load.decode_fits(0, 1)
    released(load, where, where, 17, 9)
    assert load.decode_reserved_tokens == [32] and load.decode_mean_tokens == [9]
    assert load.decode_fits(0, 17) and load.executor_fits(0, 64) and not load.executor_fits(0, 65)

"""The attempt (serve/attempt.py): what it depends on and what its one cleanup frees, by stage.

Actors are recorders here (each call is logged and returns at once); the load ledger is
the real one (serve/admission.py), which must be all zeros once every attempt ended.
"""

from __future__ import annotations

import asyncio

import pytest

from adrenaline.app_config import LimitsConfig
from adrenaline.policy import Placement
from adrenaline.policy.load import new_cluster_load
from adrenaline.serve.admission import Admission
from adrenaline.serve.attempt import Attempt, Control, SharedPrefill, Stage


class _Method:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, *args))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class _Actor:
    def __init__(self, role: str, log: list):
        self.role, self.log = role, log

    def __getattr__(self, method: str):
        return _Method(self.log, f"{self.role}.{method}")


class _Cluster:
    def __init__(self, log: list):
        self.actors = {r: _Actor(r, log) for r in ("prefill", "decode", "executor")}

    def epoch(self, role: str, i: int) -> int:
        return 0

    def actor(self, role: str, i: int):
        return self.actors[role]


def _attempt(shared: bool = False) -> tuple[Attempt, Admission, list]:
    adm = Admission(LimitsConfig())
    load = new_cluster_load(1, [1000], [1000])
    a = Attempt("r", 0, asyncio.Queue(), Placement(0, 0), load, adm, reserved=100, mean_kv=60,
                shared=SharedPrefill(0, None, 0) if shared else None)
    a.placed()
    return a, adm, []


def _advance(a: Attempt, cluster: _Cluster, to: Stage) -> None:
    """Walk ``a`` through the router's transitions up to stage ``to``."""
    if to is Stage.WAITING:
        return
    a.prefilling()
    a.use(cluster, "prefill", a.p)
    if to is Stage.PREFILLING:
        return
    a.prefilled()
    a.parked()
    if to is Stage.PARKED:
        return
    a.admitted(Placement(0, 0, offload=to is Stage.DECODING_OFFLOADED))
    a.use(cluster, "decode", a.d)
    if a.offloaded:
        a.use(cluster, "executor", a.p)


def _idle(adm: Admission, load) -> bool:
    return (adm.num_queued == 0 and not any(load.decode_reserved_tokens)
            and not any(load.executor_reserved_tokens) and not any(load.prefill_inflight))


@pytest.mark.parametrize("stage, done, expected", [
    (Stage.WAITING, False, []),
    (Stage.PREFILLING, False, ["prefill.release"]),
    (Stage.PARKED, False, ["prefill.release"]),
    (Stage.DECODING_LOCAL, False, ["prefill.release", "decode.abort"]),
    (Stage.DECODING_OFFLOADED, False, ["prefill.release", "decode.abort",
                                       "executor.free_request"]),
    (Stage.DECODING_LOCAL, True, []),
    (Stage.DECODING_OFFLOADED, True, ["executor.free_request"]),
])
def test_cleanup_frees_by_the_stage_reached(stage, done, expected):
    async def run():
        a, adm, log = _attempt()
        cluster = _Cluster(log)
        _advance(a, cluster, stage)
        if done:
            a.done()
        a.close(0, lambda role, i, epoch: True)
        for _ in range(5):
            await asyncio.sleep(0)
        assert [c[0] for c in log] == expected
        assert all(c[1] == "r" for c in log)
        assert _idle(adm, a.load)

    asyncio.run(run())


def test_a_shared_prefill_is_left_to_the_n_choice_request():
    async def run():
        a, adm, log = _attempt(shared=True)
        _advance(a, _Cluster(log), Stage.PREFILLING)
        a.close(0, lambda role, i, epoch: True)
        await asyncio.sleep(0)
        assert log == [] and _idle(adm, a.load)

    asyncio.run(run())


def test_nothing_is_freed_on_a_replaced_cluster_or_a_lost_actor():
    async def run():
        a, adm, log = _attempt()
        _advance(a, _Cluster(log), Stage.DECODING_OFFLOADED)
        a.close(1, lambda role, i, epoch: True)  # generation 1 replaced the attempt's 0
        b, adm_b, log_b = _attempt()
        _advance(b, _Cluster(log_b), Stage.DECODING_OFFLOADED)
        b.close(0, lambda role, i, epoch: role != "decode")  # its decode instance was lost
        for _ in range(5):
            await asyncio.sleep(0)
        assert log == [] and _idle(adm, a.load)
        assert [c[0] for c in log_b] == ["prefill.release", "executor.free_request"]
        assert _idle(adm_b, b.load)

    asyncio.run(run())


def test_depends_on_follows_the_stage_and_lose_says_restart():
    async def run():
        a, _, log = _attempt()
        cluster = _Cluster(log)
        assert not any(a.depends_on(r, 0) for r in ("prefill", "decode", "executor"))
        _advance(a, cluster, Stage.PARKED)
        assert a.depends_on("prefill", 0) and not a.depends_on("decode", 0)
        _advance(a, cluster, Stage.DECODING_OFFLOADED)
        assert all(a.depends_on(r, 0) for r in ("prefill", "decode", "executor"))
        a.handed_off = True
        assert not a.depends_on("prefill", 0) and a.depends_on("executor", 0)
        assert not a.depends_on("decode", 1)
        a.lose()
        assert a.stage is Stage.LOST and a.reached is Stage.DECODING_OFFLOADED and a.offloaded
        assert a.queue.get_nowait() is Control.RESTART

    asyncio.run(run())

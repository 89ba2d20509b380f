"""serve/router_resume.py against a scripted router handle (no Ray cluster): what the
ingress resends after each kind of loss, and when it gives up.

Each fake router call is scripted: the deltas it yields, then how it ends (a final
delta, an ActorDiedError, an early end, or a hang). The tests check the requests the
ingress sent (ids, carried tokens, per-choice params) and the deltas it passed on.
"""

from __future__ import annotations

import asyncio

import pytest
import ray.exceptions

from adrenaline.app_config import RecoveryConfig
from adrenaline.errors import ServiceUnavailableError
from adrenaline.protocol import GenerateRequest, ModelInfo, TokenDelta, choice_request_id
from adrenaline.sampling_params import SamplingParams
from adrenaline.serve.router_resume import RouterLink, is_router_loss

DIED = "died"
HANG = "hang"
INFO = ModelInfo(name="m", model_dir="/m", max_model_len=64, vocab_size=100,
                 max_request_tokens=64)


class _Gen:
    """A scripted streaming call: ``items`` are deltas, then DIED, HANG or nothing (ends)."""

    def __init__(self, items: list):
        self._items = list(items)
        self.cancelled = False

    async def __anext__(self) -> TokenDelta:
        await asyncio.sleep(0)
        if not self._items:
            raise StopAsyncIteration
        item = self._items.pop(0)
        if item == DIED:
            raise ray.exceptions.ActorDiedError()
        if item == HANG:
            await asyncio.Event().wait()
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self.remote = fn


class _Router:
    """A handle whose generate() calls follow ``scripts`` (request -> items), in order."""

    def __init__(self, scripts, info_fails: int = 0):
        self._scripts = list(scripts)
        self.sent: list[GenerateRequest] = []
        self._info_fails = info_fails
        self.generate = _Method(self._generate)
        self.model_info = _Method(self._model_info)

    def options(self, **_):
        return self

    def _generate(self, req: GenerateRequest) -> _Gen:
        self.sent.append(req)
        return _Gen(self._scripts.pop(0)(req))

    async def _model_info(self) -> ModelInfo:
        if self._info_fails:
            self._info_fails -= 1
            raise ray.exceptions.ActorDiedError()
        return INFO


def _d(rid: str, *tokens: int, finish: str | None = None, index: int = 0) -> TokenDelta:
    return TokenDelta(request_id=rid, token_ids=list(tokens), finish_reason=finish, index=index)


def _req(n: int = 1, seed: int | None = None) -> GenerateRequest:
    return GenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                           params=SamplingParams(max_tokens=8, n=n, seed=seed,
                                                 temperature=0.0 if seed is None else 0.8))


async def _drain(stream) -> list[TokenDelta]:
    return [d async for d in stream]


def _run(router: _Router, req: GenerateRequest, timeout_s: float = 30.0):
    aborted: list[str] = []

    async def go():
        link = RouterLink(router, RecoveryConfig(timeout_s=timeout_s))
        out = await _drain(link.stream(req, aborted.append))
        return out, link

    out, link = asyncio.run(go())
    return out, link, aborted


def test_a_dead_router_is_resent_the_tokens_already_passed_on():
    router = _Router([lambda r: [_d(r.request_id, 10), _d(r.request_id, 11), DIED],
                      lambda r: [_d(r.request_id, 12), _d(r.request_id, 13, finish="length")]])
    out, link, aborted = _run(router, _req())
    assert [t for d in out for t in d.token_ids] == [10, 11, 12, 13]  # each once
    assert all(d.request_id == "r" for d in out) and out[-1].finish_reason == "length"
    first, again = router.sent
    assert first.request_id == "r" and first.output_token_ids == []
    assert again.request_id == "r~1" and again.output_token_ids == [10, 11]
    assert again.prompt_token_ids == [1, 2, 3] and again.params == first.params
    assert link.up and link.num_losses == 1 and link.num_resends == 1
    assert aborted == []  # a dead router holds nothing to abort


def test_a_stream_ending_without_its_final_delta_is_resent_and_aborted():
    router = _Router([lambda r: [_d(r.request_id, 10)],  # ends: no finish reason
                      lambda r: [_d(r.request_id, 11, finish="stop")]])
    out, link, aborted = _run(router, _req())
    assert [t for d in out for t in d.token_ids] == [10, 11]
    assert router.sent[1].output_token_ids == [10]
    assert aborted == ["r"]  # the router may live on: its copy is aborted there


def test_a_loss_before_any_token_resends_the_request_as_it_came():
    router = _Router([lambda r: [DIED],
                      lambda r: [_d(r.request_id, 5, index=i) for i in (0, 1)]
                      + [_d(r.request_id, 6, finish="length", index=i) for i in (0, 1)]])
    out, _, _ = _run(router, _req(n=2, seed=7))
    again = router.sent[1]
    assert again.request_id == "r~1" and again.params.n == 2 and again.output_token_ids == []
    assert sorted((d.index, d.token_ids[0]) for d in out) == [(0, 5), (0, 6), (1, 5), (1, 6)]


def test_n_choices_resume_one_request_per_unfinished_choice():
    # Choice 1 finished before the loss; choice 0 and 2 carry their own tokens on.
    def first(r):
        return [_d(r.request_id, 10, index=0), _d(r.request_id, 20, finish="stop", index=1),
                _d(r.request_id, 30, index=2), _d(r.request_id, 31, index=2), DIED]

    def choice(r):
        return [_d(r.request_id, 99, finish="length")]  # index 0: the router's n=1 default

    router = _Router([first, choice, choice])
    out, link, _ = _run(router, _req(n=3, seed=40))
    resent = {r.request_id: r for r in router.sent[1:]}
    assert set(resent) == {choice_request_id("r~1", 0), choice_request_id("r~1", 2)}
    c0, c2 = resent["r~1/0"], resent["r~1/2"]
    assert (c0.output_token_ids, c2.output_token_ids) == ([10], [30, 31])
    assert (c0.params.n, c0.params.seed, c2.params.seed) == (1, 40, 42)  # for_choice(i)
    tokens = {i: [t for d in out if d.index == i for t in d.token_ids] for i in range(3)}
    assert tokens == {0: [10, 99], 1: [20], 2: [30, 31, 99]}
    assert link.num_resends == 2


def test_a_stopped_choice_is_not_resent():
    async def go():
        router = _Router([lambda r: [_d(r.request_id, 10, index=0), _d(r.request_id, 20, index=1),
                                     DIED],
                          lambda r: [_d(r.request_id, 11, finish="length")]])
        aborted: list[str] = []
        stream = RouterLink(router, RecoveryConfig()).stream(_req(n=2), aborted.append)
        out = [await stream.__anext__(), await stream.__anext__()]
        stream.stop_choice(1)  # a stop string matched in choice 1
        out += await _drain(stream)
        return router, out, aborted

    router, out, aborted = asyncio.run(go())
    assert aborted == ["r/1"]
    assert [r.request_id for r in router.sent] == ["r", "r~1/0"]  # choice 0 alone, n=1
    assert router.sent[1].output_token_ids == [10] and router.sent[1].params.n == 1
    assert out[-1].index == 0 and out[-1].finish_reason == "length"


def test_waits_for_the_router_while_it_is_down():
    router = _Router([lambda r: [_d(r.request_id, 1), DIED],
                      lambda r: [_d(r.request_id, 2, finish="length")]], info_fails=3)
    out, link, _ = _run(router, _req())
    assert [t for d in out for t in d.token_ids] == [1, 2] and link.up


def test_past_the_recovery_timeout_the_request_ends_with_service_unavailable():
    async def go():
        router = _Router([lambda r: [_d(r.request_id, 1), DIED]], info_fails=10 ** 6)
        link = RouterLink(router, RecoveryConfig(timeout_s=0.5))
        stream = link.stream(_req(), lambda rid: None)
        first = await stream.__anext__()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ServiceUnavailableError, match="recovery.timeout_s"):
            await stream.__anext__()
        waited = loop.time() - t0
        assert not link.up
        # A new request past the deadline is refused at once.
        t1 = loop.time()
        with pytest.raises(ServiceUnavailableError):
            await link.stream(_req(), lambda rid: None).__anext__()
        return first, waited, loop.time() - t1, router

    first, waited, refused_s, router = asyncio.run(go())
    assert first.token_ids == [1] and 0.4 < waited < 3.0 and refused_s < 0.1
    assert len(router.sent) == 1  # nothing sent while the router was away


def test_only_a_lost_replica_counts_as_a_loss():
    died = ray.exceptions.ActorDiedError()
    assert is_router_loss(died) and is_router_loss(ray.exceptions.ActorUnavailableError("x", b"1" * 16))
    # Raised by the router's own code (e.g. a worker's death it did not absorb): an answer.
    wrapped = ray.exceptions.RayTaskError("generate", "tb", died).as_instanceof_cause()
    assert isinstance(wrapped, ray.exceptions.RayActorError) and not is_router_loss(wrapped)
    assert not is_router_loss(ValueError("x"))

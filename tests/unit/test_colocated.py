"""One-process prefill + executor + decode over the in-process transport equals the offline engine."""

from __future__ import annotations

import random

import pytest
import torch

from adrenaline.config import EngineConfig
from adrenaline.engine.colocated import ColocatedPD
from adrenaline.engine.cuda_graphs import PiecewiseDecodeGraphs
from adrenaline.engine.llm import LLM
from adrenaline.sampling_params import SamplingParams
from adrenaline.transport.local import LocalWorld


@pytest.mark.parametrize("dtype,piecewise,inline", [
    ("float32", False, False), ("bfloat16", False, False), ("float32", True, False),
    ("float32", True, True)])
def test_colocated_offload_matches_offline(dtype, piecewise, inline):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny", dtype=dtype).generate(prompts, params)]
    pd = ColocatedPD("tiny", dtype=dtype, prefill=EngineConfig(kv_cache_tokens=2048),
                     decode=EngineConfig(kv_cache_tokens=1024),
                     executor=EngineConfig(kv_cache_tokens=1024), inline=inline)
    if piecewise:  # the offloaded steps' per-layer segments, run eagerly, with 2 padding rows
        pd.decode.runner.piecewise = PiecewiseDecodeGraphs(pd.decode.model, 8, pd.decode.device,
                                                           capture=False)
    try:
        got = pd.generate(prompts, params, offload=lambda i: i % 2 == 0)
        if piecewise:
            assert pd.decode.runner.piecewise.num_replays > 0
        assert [r.output_token_ids for r in got] == expected
        assert pd.num_offloaded == 3
        assert pd.blocks_in_use() == {"prefill": 0, "decode": 0, "executor": 0}
        assert pd.executor.num_steps > 0
    finally:
        pd.close()


def test_local_transport_orders_messages_and_wakes_on_close():
    world = LocalWorld(2)
    a, b = world.communicator(0), world.communicator(1)
    x = torch.arange(6, dtype=torch.bfloat16)
    a.send(x, 1, tag=5)
    x.zero_()  # the sender may reuse its buffer once send returns
    a.isend(torch.ones(6, dtype=torch.bfloat16), 1, tag=5)
    first, second = torch.empty(6, dtype=torch.bfloat16), torch.empty(6, dtype=torch.bfloat16)
    b.recv(first, 0, tag=5)
    b.recv(second, 0, tag=5)
    assert first.tolist() == list(range(6)) and second.tolist() == [1.0] * 6
    with pytest.raises(ValueError):
        a.send(x, 0)  # no self-messages
    pending = b.irecv(torch.empty(3), 0, tag=9)
    world.close()
    with pytest.raises(RuntimeError):
        pending.wait()


@pytest.mark.parametrize("piecewise", [False, True])
def test_capacity_placement_offloads_what_decode_cannot_hold(piecewise):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(30)] for _ in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM("tiny").generate(prompts, params)]
    # 40 tokens -> 3 blocks of 16 per request: decode holds 2 requests, the executor 4.
    pd = ColocatedPD("tiny", prefill=EngineConfig(kv_cache_tokens=1024),
                     decode=EngineConfig(kv_cache_tokens=96),
                     executor=EngineConfig(kv_cache_tokens=192))
    if piecewise:  # mixed steps of up to 6 requests through segments padded to buckets 4 and 8
        pd.decode.runner.piecewise = PiecewiseDecodeGraphs(pd.decode.model, 8, pd.decode.device,
                                                           capture=False)
    try:
        got = pd.generate(prompts, params, offload="capacity")
        assert [r.output_token_ids for r in got] == expected
        assert pd.num_offloaded >= 4
        assert pd.batch_size_sum / pd.num_steps > 2  # more than the decode pool alone holds
        assert pd.blocks_in_use() == {"prefill": 0, "decode": 0, "executor": 0}
        assert pd.decode.scheduler.num_preemptions == 0
    finally:
        pd.close()


def test_executor_failure_surfaces_instead_of_hanging():
    prompts = [[5, 6, 7, 8]] * 2
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    pd = ColocatedPD("tiny", prefill=EngineConfig(kv_cache_tokens=256),
                     decode=EngineConfig(kv_cache_tokens=256),
                     executor=EngineConfig(kv_cache_tokens=256))

    def broken(*args):
        raise ValueError("executor kernel failed")

    pd.executor.attend = broken
    try:
        with pytest.raises(RuntimeError, match="attention executor failed") as info:
            pd.generate(prompts, params, offload=lambda i: True)
        assert isinstance(info.value.__cause__, ValueError)
    finally:
        pd.close()

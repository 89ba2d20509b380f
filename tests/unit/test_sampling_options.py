"""Logits processors (penalties, min_p, logit_bias, min_tokens), the JSON-schema grammar,
n choices sharing one prefill, and their state across a handoff and a rerun (engine level)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from adrenaline import LLM, InvalidRequestError, SamplingParams
from adrenaline.config import EngineConfig
from adrenaline.engine.core import EngineCore
from adrenaline.engine.request import Request
from adrenaline.engine.sampler import Sampler
from adrenaline.kernels.sampling import apply_min_p, apply_penalties
from adrenaline.protocol import choice_request_id

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "n"], "additionalProperties": False}
PROMPT = [5, 17, 300, 42, 9, 77]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny")


def test_penalties_match_vllm_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    prompt = torch.tensor([[True, False, False, False]])
    counts = torch.tensor([[0, 2, 1, 0]])
    out = apply_penalties(logits, prompt, counts, torch.tensor([2.0]), torch.tensor([0.5]),
                          torch.tensor([0.25]))
    # token 0: prompt only -> 2/2; token 1: -1*2 - 0.5*2 - 0.25; token 2: 0.5/2 - 0.5 - 0.25
    assert out.tolist() == [[1.0, -3.25, -0.5, 3.0]]


def test_min_p_keeps_tokens_near_the_top():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_min_p(logits, torch.tensor([0.35])))
    assert kept.tolist() == [[True, True, False, False]]  # 0.15 < 0.35 * 0.5


def test_logit_bias_and_min_tokens_steer_greedy():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])  # token 1 is EOS here
    r = Request("r", [2], SamplingParams(temperature=0, logit_bias=((2, 10.0),)), arrival=0,
                eos_token_ids=(1,))
    assert Sampler()(logits, [r])[0] == [2]
    r = Request("r", [2], SamplingParams(temperature=0, min_tokens=2, max_tokens=4), arrival=0,
                eos_token_ids=(1,))
    assert Sampler()(logits, [r])[0] == [3]  # EOS masked before min_tokens outputs
    r.append_token(3)
    r.append_token(3)
    assert Sampler()(logits, [r])[0] == [1]


def test_penalties_change_greedy_output(llm):
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0,
                                                  ignore_eos=True))[0].token_ids
    pen = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                frequency_penalty=2.0, presence_penalty=2.0)
                       )[0].token_ids
    assert len(set(pen)) > len(set(plain))  # repeats are discouraged
    assert len(set(pen)) == len(pen)  # a +4 logit penalty per repeat: tiny never repeats


def test_bad_values_are_rejected():
    for kw in ({"presence_penalty": 3}, {"repetition_penalty": 0}, {"min_p": 2},
               {"min_tokens": 20}, {"n": 0}, {"logit_bias": ((3, 200.0),)}):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kw)


def test_json_schema_output_validates(llm):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3,
                            json_schema=json.dumps(SCHEMA))
    outs = llm.generate([PROMPT, PROMPT[:3]], [params, params])
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_unusable_schema_is_invalid_request(llm):
    with pytest.raises(InvalidRequestError, match="schema"):
        llm.generate([PROMPT], SamplingParams(json_schema='{"type": "nonsense"}'))


@pytest.fixture(scope="module")
def engines() -> tuple[EngineCore, EngineCore]:
    cfg = EngineConfig(kv_cache_tokens=512, block_size=8)
    return EngineCore("tiny", config=cfg), EngineCore("tiny", config=cfg)


def _prefill_then_decode(engines, rid: str, params: SamplingParams,
                         outputs: list[int] = ()) -> list[int]:
    """Prefill on one engine (optionally as a rerun after ``outputs``), decode on another."""
    prefill, decode = engines
    prefill.add_request(rid, PROMPT, params, output_token_ids=list(outputs))
    (req,) = prefill.prefill_step()
    if req.finish_reason is not None:
        return req.output_token_ids
    kv = prefill.export_kv(rid)
    prefill.release(rid)
    moved = Request(rid, PROMPT, params, arrival=0, eos_token_ids=(1,))
    moved.token_ids, moved.num_computed = list(req.token_ids), req.num_computed
    decode.adopt(moved, kv)  # rebuilds the grammar state from the output so far
    while not moved.is_finished:
        decode.step()
    return moved.output_token_ids


def test_state_follows_handoff_and_rerun(llm, engines):
    params = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.8,
                            frequency_penalty=0.7, min_tokens=3, json_schema=json.dumps(SCHEMA))
    whole = llm.generate([PROMPT], params)[0].token_ids
    assert _prefill_then_decode(engines, "h", params) == whole
    # A rerun after k streamed tokens continues exactly (penalties and grammar see them).
    for k in (1, len(whole) // 2):
        assert _prefill_then_decode(engines, f"r{k}", params, whole[:k]) == whole


def test_n_choices_share_one_prefill(llm, engines):
    e = engines[0]
    free = e.block_manager.num_free_blocks
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7)
    e.add_request("g", PROMPT * 3, params)
    (parent,) = e.prefill_step()
    ids = [choice_request_id("g", i) for i in range(3)]
    assert sorted(e.held) == ids and len(parent.choices) == 3
    used = free - e.block_manager.num_free_blocks
    assert used == e.block_manager.blocks_for(len(PROMPT) * 3)  # one copy of the prompt
    kvs = [e.export_kv(i) for i in ids]
    assert all(torch.equal(kvs[0], kv) for kv in kvs[1:])
    # Choice i is seeded seed + i: the same as a single request with that seed.
    for i, c in enumerate(parent.choices):
        single = llm.generate([PROMPT * 3], SamplingParams(
            max_tokens=1, temperature=1.0, seed=7 + i))[0].token_ids
        assert c.output_token_ids == single
    e.release(ids[0])
    e.release(ids[1])
    assert free - e.block_manager.num_free_blocks == used  # the last choice still holds them
    e.release(ids[2])
    assert e.block_manager.num_free_blocks == free and not e.requests and not e.held

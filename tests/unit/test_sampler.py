"""Sampling: greedy, seeded reproducibility, top-k/top-p support, stop rules, logprobs."""

from __future__ import annotations

import pytest
import torch

from adrenaline import InvalidRequestError, SamplingParams
from adrenaline.engine.request import Request
from adrenaline.engine.sampler import Sampler
from adrenaline.kernels.sampling import apply_top_k_top_p


def _reqs(*params: SamplingParams) -> list[Request]:
    return [Request(f"r{i}", [1, 2], p, arrival=i) for i, p in enumerate(params)]


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = apply_top_k_top_p(logits, torch.tensor([2, -1, -1]), torch.tensor([1.0, 0.7, 0.85]))
    kept = torch.isfinite(out)
    assert kept.tolist() == [[True, True, False, False],   # top-2
                             [True, True, False, False],   # 0.5 < 0.7 <= 0.8
                             [True, True, True, False]]    # 0.8 < 0.85 <= 0.95


def test_sampled_tokens_stay_in_top_k_and_seed_reproduces():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    allowed = set(logits.topk(3).indices[0].tolist())
    p = SamplingParams(temperature=1.5, top_k=3, seed=42)
    r1, r2 = _reqs(p)[0], _reqs(p)[0]

    def draws(sampler, r):
        out = []
        for _ in range(30):  # one draw per position, as in decoding
            out.append(sampler(logits, [r])[0][0])
            r.token_ids.append(out[-1])
        return out

    a, b = draws(Sampler(seed=1), r1), draws(Sampler(seed=2), r2)
    assert set(a) <= allowed
    assert a == b  # the request's own seed decides, not the engine's
    assert len(set(a)) > 1  # and it really samples


def test_greedy_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    tokens, lps = Sampler()(logits, _reqs(SamplingParams(temperature=0, logprobs=2)))
    assert tokens == [1]
    ref = logits.log_softmax(-1)[0]
    assert set(lps[0]) == {1, 3}
    assert lps[0][3] == pytest.approx(float(ref[3]))


def test_stop_rules():
    r = Request("r", [5], SamplingParams(max_tokens=10, stop_token_ids=(9,)), arrival=0,
                eos_token_ids=(1,))
    r.append_token(3)
    assert r.finish_reason is None
    r.append_token(9)
    assert r.finish_reason == "stop"
    r = Request("r", [5], SamplingParams(max_tokens=10, ignore_eos=True), arrival=0,
                eos_token_ids=(1,))
    r.append_token(1)
    assert r.finish_reason is None
    r = Request("r", [5], SamplingParams(max_tokens=2), arrival=0, max_model_len=100)
    r.append_token(4)
    r.append_token(4)
    assert r.finish_reason == "length"


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=0), dict(logprobs=50)])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_seeded_draw_depends_only_on_seed_and_position():
    """A rerun (a fresh Request over prompt + tokens already produced) draws what the
    uninterrupted request would have drawn at that position: no generator state to carry."""
    torch.manual_seed(1)
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=2.0, seed=7)
    whole = Request("a", [1, 2], p, arrival=0)
    tokens = []
    for _ in range(12):
        tokens.append(Sampler()(logits, [whole])[0][0])
        whole.token_ids.append(tokens[-1])
    rerun = Request("a", [1, 2] + tokens[:5], p, arrival=0)
    again = []
    for _ in range(7):
        again.append(Sampler(seed=3)(logits, [rerun])[0][0])
        rerun.token_ids.append(again[-1])
    assert again == tokens[5:] and len(set(tokens)) > 1

"""The offline LLM facade on the built-in "tiny" model: API shape, errors, no leaks."""

from __future__ import annotations

import msgspec
import pytest

from adrenaline import ConfigError, InvalidRequestError, LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", kv_cache_tokens=1024)


def _assert_idle(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.has_unfinished


def test_text_and_token_prompts_in_order(llm):
    ids = llm.tokenizer.encode("Hello world")
    outs = llm.generate(["Hello world", ids, "x"], SamplingParams(max_tokens=5, temperature=0))
    assert [o.prompt_token_ids for o in outs[:2]] == [ids, ids]
    assert outs[0].token_ids == outs[1].token_ids  # same prompt, greedy: same tokens
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    assert outs[0].prompt == "Hello world" and outs[1].prompt is None
    _assert_idle(llm)


def test_per_prompt_params_and_seeded_sampling(llm):
    params = [SamplingParams(max_tokens=3, temperature=0),
              SamplingParams(max_tokens=7, temperature=1.0, seed=5),
              SamplingParams(max_tokens=7, temperature=1.0, seed=5)]
    outs = llm.generate(["a b c"] * 3, params)
    assert [len(o.token_ids) for o in outs] == [3, 7, 7]
    assert outs[1].token_ids == outs[2].token_ids  # same seed, same draw, despite batching
    # A rerun from prompt + the first 3 tokens (as recovery does) continues the same draws.
    rerun = llm.generate([outs[1].prompt_token_ids + outs[1].token_ids[:3]],
                         SamplingParams(max_tokens=4, temperature=1.0, seed=5))[0]
    assert rerun.token_ids == outs[1].token_ids[3:]


def test_stop_token_and_logprobs(llm):
    greedy = llm.generate("stop here", SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    stop = greedy[2]
    out = llm.generate("stop here", SamplingParams(max_tokens=6, temperature=0,
                                                    stop_token_ids=(stop,), logprobs=3))[0]
    assert out.token_ids == greedy[:greedy.index(stop) + 1] and out.finish_reason == "stop"
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and 3 <= len(lp) <= 4
        assert lp[tok] == max(lp.values())  # greedy picks the most likely


def test_eos_stops_unless_ignored(tmp_path):
    llm = LLM("tiny", kv_cache_tokens=1024)
    first = llm.generate("eos?", SamplingParams(max_tokens=4, temperature=0))[0].token_ids[0]
    # Make that first greedy token the model's EOS: generation must stop right there.
    llm.engine.model_config = msgspec.structs.replace(llm.engine.model_config,
                                                      eos_token_ids=(first,))
    out = llm.generate("eos?", SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    out = llm.generate("eos?", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_context_limit_finishes_with_length():
    llm = LLM("tiny", max_model_len=12, kv_cache_tokens=256)
    out = llm.generate([list(range(3, 13 - 3))], SamplingParams(max_tokens=50, temperature=0))[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 12 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([1, 2, 99999], SamplingParams(), "vocabulary"),
    ([-1], SamplingParams(), "vocabulary"),
    (list(range(1, 3000)), SamplingParams(), "context"),
    ([1, 2], SamplingParams(max_tokens=1900), "KV cache"),
])
def test_bad_requests_raise_and_leak_nothing(llm, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate([[5, 6], prompt], params)
    _assert_idle(llm)
    assert llm.generate([[5, 6]], SamplingParams(max_tokens=2))[0].finish_reason == "length"


def test_bad_options_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="block_size"):
        LLM("tiny", block_size=3)
    with pytest.raises(ConfigError, match="unknown engine option"):
        LLM("tiny", kv_cache_tokns=10)
    with pytest.raises(ConfigError, match="neither a built-in"):
        LLM("no-such-model")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "hidden_size": 8,'
                                          ' "intermediate_size": 8, "num_hidden_layers": 1,'
                                          ' "num_attention_heads": 1, "vocab_size": 8}')
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    with pytest.raises(ConfigError, match="dtype"):
        LLM("tiny", dtype="int8")

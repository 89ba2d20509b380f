"""serving_workloads: the ShareGPT loader on a hand-made file, and arrival times.

The encoder splits on whitespace, so a turn's token count is its word count and every
expected length below can be read off the file.
"""

from __future__ import annotations

import json
import math

import pytest

from adrenaline.bench.serving_workloads import (DatasetError, arrival_offsets, load_sharegpt,
                                               random_requests, sharegpt_requests)


def words(n: int, w: str = "w") -> str:
    return " ".join([w] * n)


def encode(text: str) -> list[int]:
    return [len(t) for t in text.split()]


# (prompt words, output words) -> kept or dropped, and why
CONVERSATIONS = [
    ([words(5, "a"), words(6)], True),           # kept: (5, 6)
    ([words(10, "b"), words(4), words(99)], True),  # kept: (10, 4); only two turns count
    ([words(3, "c"), words(50)], False),          # prompt < 4 tokens
    ([words(8, "d"), words(3)], False),           # output < 4 tokens
    ([words(1025, "e"), words(10)], False),       # prompt > 1024
    ([words(1000, "f"), words(1049)], False),     # prompt + output > 2048
    ([words(1000, "g"), words(1048)], True),      # kept: exactly 2048
    ([words(7, "h")], False),                     # one turn
]


@pytest.fixture
def sharegpt_file(tmp_path):
    data = [{"id": str(i), "conversations": [
        {"from": "human" if j % 2 == 0 else "gpt", "value": v} for j, v in enumerate(turns)]}
        for i, (turns, _) in enumerate(CONVERSATIONS)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_sharegpt_lengths_and_filters(sharegpt_file):
    reqs = sharegpt_requests(sharegpt_file, 100, encode, seed=3)
    assert sorted((r.prompt_len, r.output_len) for r in reqs) == [(5, 6), (10, 4), (1000, 1048)]
    for r in reqs:
        assert isinstance(r.prompt, str) and len(encode(r.prompt)) == r.prompt_len
    # The prompt is the first turn's text itself, not the second's.
    assert {r.prompt.split()[0] for r in reqs} == {"a", "b", "g"}


def test_sharegpt_fixed_output_len_and_num_prompts(sharegpt_file):
    reqs = sharegpt_requests(sharegpt_file, 100, encode, fixed_output_len=32)
    # With 32 output tokens the 3-token prompt is still too short; (8 -> 3) and both
    # 1000-token prompts now pass; 1025 tokens is still too long.
    assert sorted((r.prompt_len, r.output_len) for r in reqs) == [
        (5, 32), (8, 32), (10, 32), (1000, 32), (1000, 32)]
    two = sharegpt_requests(sharegpt_file, 2, encode, seed=1)
    assert len(two) == 2
    assert two == sharegpt_requests(sharegpt_file, 2, encode, seed=1)  # deterministic


def test_load_sharegpt_keeps_first_two_turns(sharegpt_file):
    pairs = load_sharegpt(sharegpt_file)
    assert len(pairs) == len(CONVERSATIONS) - 1  # the one-turn conversation is skipped
    assert pairs[1] == (words(10, "b"), words(4))


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ('{"conversations": []}', "JSON list of conversations, got dict"),
    ('[{"id": "x"}]', 'entry 0 has no "conversations" list'),
    ('[{"conversations": [{"value": "hi there"}, {"from": "gpt"}]}]',
     'entry 0, turn 1 has no string "value"'),
    ('[{"conversations": [{"value": "a b c d"}, {"value": "e f g h"}]}, "oops"]',
     'entry 1 has no "conversations" list'),
])
def test_bad_sharegpt_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message) as info:
        sharegpt_requests(str(path), 4, encode)
    assert str(path) in str(info.value)


def test_missing_sharegpt_file(tmp_path):
    with pytest.raises(DatasetError, match="cannot read ShareGPT file"):
        load_sharegpt(str(tmp_path / "nope.json"))


def test_arrival_offsets():
    assert arrival_offsets(3, math.inf) == [0.0, 0.0, 0.0]
    offs = arrival_offsets(4000, 5.0, burstiness=1.0, seed=0)
    assert offs[0] == 0.0 and all(b >= a for a, b in zip(offs, offs[1:]))
    assert offs[-1] / (len(offs) - 1) == pytest.approx(0.2, rel=0.05)  # mean gap 1 / rate
    with pytest.raises(ValueError):
        arrival_offsets(2, 0.0)


def test_random_requests_lengths():
    reqs = random_requests(50, input_len=100, output_len=20, vocab_size=300, range_ratio=0.5)
    assert all(50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30 for r in reqs)
    assert all(len(r.prompt) == r.prompt_len and 10 <= min(r.prompt) and max(r.prompt) < 290
               for r in reqs)


def test_multi_turn_prompts_extend_the_previous_turn_and_schedule_is_fixed():
    from adrenaline.bench.serving_workloads import (history_fraction, multi_turn_conversations,
                                                    multi_turn_schedule)

    convs = multi_turn_conversations(5, 4, vocab_size=4096, system_len=128, user_len=96,
                                     answer_len=32, output_len=16, seed=1)
    for conv in convs:
        assert conv[0].prompt[:128] == convs[0][0].prompt[:128]  # one shared system prompt
        for prev, cur in zip(conv, conv[1:]):
            assert cur.prompt[:prev.prompt_len] == prev.prompt  # the whole previous prompt
            assert cur.prompt_len == prev.prompt_len + 32 + 96 and cur.history_len == cur.prompt_len - 96
    reqs, offsets = multi_turn_schedule(convs, conversation_rate=2.0, turn_gap_s=5.0, seed=1)
    assert offsets == sorted(offsets) and len(reqs) == 20
    again = multi_turn_schedule(multi_turn_conversations(5, 4, 4096, 128, 96, 32, 16, seed=1),
                                2.0, 5.0, seed=1)
    assert again[1] == offsets and [r.prompt for r in again[0]] == [r.prompt for r in reqs]
    start = {id(c[0]): o for r, o in zip(reqs, offsets) for c in convs if r is c[0]}
    for c in convs:  # turn k at the conversation's start + k * gap
        k3 = offsets[[i for i, r in enumerate(reqs) if r is c[3]][0]]
        assert abs(k3 - (start[id(c[0])] + 15.0)) < 1e-9
    assert history_fraction(reqs) >= 0.75


def test_sharegpt_multi_turn_builds_each_turn_on_the_text_before(tmp_path):
    import json

    from adrenaline.bench.serving_workloads import sharegpt_multi_turn

    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": f"turn {i} " + "w " * 10}
            for i in range(6)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": conv}, {"conversations": conv[:2]}]))
    (reqs,) = sharegpt_multi_turn(str(path), 5, 3, encode=lambda t: t.split())
    assert [r.prompt.count("turn") for r in reqs] == [1, 3, 5]
    assert reqs[2].prompt.startswith(reqs[1].prompt) and reqs[0].history_len == 0


def test_long_decode_lengths_prompts_and_seed(smollm2_dir):
    from adrenaline.bench.serving_workloads import (LONG_DECODE_INPUT, LONG_DECODE_OUTPUT,
                                                   long_decode_lengths, long_decode_requests)
    from adrenaline.model.tokenizer import Tokenizer

    lens = long_decode_lengths(200, seed=3)
    assert lens == long_decode_lengths(200, seed=3) != long_decode_lengths(200, seed=4)
    assert all(LONG_DECODE_INPUT[0] <= i <= LONG_DECODE_INPUT[1] for i, _ in lens)
    assert all(LONG_DECODE_OUTPUT[0] <= o <= LONG_DECODE_OUTPUT[1] for _, o in lens)
    tok = Tokenizer(smollm2_dir)
    reqs = long_decode_requests(5, tok.vocab_size, seed=3,
                                encode=lambda t: tok.encode(t, add_special_tokens=False))
    assert [(r.prompt_len, r.output_len) for r in reqs] == long_decode_lengths(5, seed=3)
    assert all(len(r.prompt) == r.prompt_len for r in reqs)
    assert "step by step" in tok.decode(reqs[0].prompt)  # chat-like text, not random ids
    # Without a tokenizer: random ids of the same lengths.
    plain = long_decode_requests(5, 1000, seed=3)
    assert [len(r.prompt) for r in plain] == [i for i, _ in long_decode_lengths(5, seed=3)]

"""Simulated requests: the serving benchmark's datasets and arrival processes, or a trace.

Lengths and arrival times come from bench/serving_workloads.py (the same draws
for the same seed, so a simulated run and a live `bench serving` run see the
same requests); only the prompts' token ids are not drawn (the simulator needs
lengths). A trace file is JSON lines ``{"arrival_s": .., "prompt_len": .., "output_len": ..}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from adrenaline.bench import serving_workloads as sw


@dataclass(frozen=True)
class SimArrival:
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    dataset: str = "random"  # random | sharegpt-synthetic | long-decode | sharegpt | trace
    num_prompts: int = 100
    input_len: int = 128  # random: mean; synthetic: median
    output_len: int = 128
    range_ratio: float = 0.0
    dataset_path: str | None = None  # sharegpt JSON or trace JSONL
    tokenizer: str | None = None  # model dir with tokenizer.json (sharegpt)
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0


def lengths(w: Workload) -> list[tuple[int, int]]:
    if w.dataset == "random":
        if not 0 <= w.range_ratio < 1:
            raise ValueError(f"range_ratio must be in [0, 1), got {w.range_ratio}")
        rng = np.random.default_rng(w.seed)  # the draws random_requests makes, in its order
        ins = sw._uniform_lens(rng, w.num_prompts, w.input_len, w.range_ratio)
        outs = sw._uniform_lens(rng, w.num_prompts, w.output_len, w.range_ratio)
        return list(zip(ins, outs))
    if w.dataset == "sharegpt-synthetic":
        return sw.synthetic_sharegpt_lengths(w.num_prompts, w.input_len, w.output_len, w.seed)
    if w.dataset == "long-decode":
        return sw.long_decode_lengths(w.num_prompts, w.seed)
    if w.dataset == "sharegpt":
        if not w.dataset_path:
            raise ValueError("dataset sharegpt needs a dataset path")
        encode = _encoder(w.tokenizer)
        return [(r.prompt_len, r.output_len)
                for r in sw.sharegpt_requests(w.dataset_path, w.num_prompts, encode, seed=w.seed)]
    raise ValueError(f"dataset: unknown {w.dataset!r} "
                     "(random, sharegpt-synthetic, long-decode, sharegpt, trace)")


def _encoder(tokenizer: str | None):
    if tokenizer is None:  # no tokenizer: about 4 characters a token
        return lambda text: [0] * max(len(text) // 4, 1)
    from adrenaline.model.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    return lambda text: tok.encode(text, add_special_tokens=False)


def arrivals(w: Workload) -> list[SimArrival]:
    if w.dataset == "trace":
        return read_trace(w.dataset_path)
    pairs = lengths(w)
    times = sw.arrival_offsets(len(pairs), w.request_rate, w.burstiness, w.seed)
    return [SimArrival(t, i, o) for t, (i, o) in zip(times, pairs)]


def read_trace(path: str | None) -> list[SimArrival]:
    if not path:
        raise ValueError("dataset trace needs a dataset path")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(SimArrival(float(d["arrival_s"]), int(d["prompt_len"]),
                                      int(d["output_len"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a trace line ({e})") from None
    return sorted(out, key=lambda a: a.arrival_s)

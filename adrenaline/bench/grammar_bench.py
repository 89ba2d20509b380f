"""The cost of a structured-output mask: decode step time with and without a JSON-schema
grammar, at each batch size.

``python -m adrenaline.bench grammar [--model tiny] [--batch-sizes 1 32] [--steps 24]``

Two engines decode the same batch (greedy, ignore_eos), one with every request under a
JSON schema, one without; their steps alternate. The schema forces a long string
(``minLength``) so that no request finishes while steps are timed. Reported: the median
step time of each, and the mask work alone (the grammar's bitmask fill and apply; the
matchers' token accepts are in the masked step time only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.bench.workloads import random_token_prompts

SCHEMA = json.dumps({"type": "object", "required": ["text"], "additionalProperties": False,
                     "properties": {"text": {"type": "string", "minLength": 2000}}})


def _engine(model: str, batch: int, steps: int, masked: bool, threads: int | None,
            prompt_len: int):
    from adrenaline import SamplingParams
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore

    engine = EngineCore(model, config=EngineConfig(
        max_num_seqs=batch, kv_cache_tokens=batch * (prompt_len + steps + 32),
        num_threads=threads, cuda_graph_max_batch=0))
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True,
                            json_schema=SCHEMA if masked else None)
    for i, p in enumerate(random_token_prompts(batch, prompt_len,
                                               engine.model_config.vocab_size)):
        engine.add_request(f"g{i}", p, params)
    while engine.scheduler.waiting:
        engine.step()  # prefills
    return engine


def measure(model: str, batch: int, steps: int, threads: int | None,
            prompt_len: int = 32) -> dict:
    """Median decode step ms of ``batch`` requests without and with the mask (steps of the
    two engines alternate, so a busy machine slows both alike), and of the mask work."""
    import adrenaline.engine.logits_processors as lp

    plain = _engine(model, batch, steps, False, threads, prompt_len)
    masked = _engine(model, batch, steps, True, threads, prompt_len)
    mask_s: list[float] = []
    apply = lp.apply_grammar_masks

    def timed_apply(logits, states):
        t = time.perf_counter()
        apply(logits, states)
        mask_s.append(time.perf_counter() - t)

    lp.apply_grammar_masks = timed_apply
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(steps):
            for is_masked, engine in ((False, plain), (True, masked)):
                t = time.perf_counter()
                stepped = engine.step()
                times[is_masked].append(time.perf_counter() - t)
                assert len(stepped) == batch and not any(r.is_finished for r in stepped)
    finally:
        lp.apply_grammar_masks = apply
    plain_ms, masked_ms = (1e3 * statistics.median(times[m]) for m in (False, True))
    return {"system": f"batch {batch}", "plain_ms": plain_ms, "masked_ms": masked_ms,
            "mask_ms": 1e3 * statistics.median(mask_s),
            "overhead_pct": 100 * (masked_ms / plain_ms - 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench grammar")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    rows = [measure(args.model, b, args.steps, args.threads) for b in args.batch_sizes]
    print_table(rows, [("plain_ms", "step ms", 10, 2), ("masked_ms", "masked ms", 10, 2),
                       ("mask_ms", "mask ms", 9, 2), ("overhead_pct", "+%", 7, 1)])
    if args.out:
        write_result({**result_header("grammar"), "model": args.model, "steps": args.steps,
                      "rows": rows}, args.out)


if __name__ == "__main__":
    main()

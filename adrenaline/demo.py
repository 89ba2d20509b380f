"""Offline generation demo on a built-in model (the main job until the Serve app exists)."""

from __future__ import annotations

import argparse
import time

from adrenaline import LLM, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time",
           "The quick brown fox"]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.demo")
    ap.add_argument("--model", default="tiny", help='built-in name ("tiny", "small") or HF directory')
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    start = time.perf_counter()
    llm = LLM(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f}s "
          f"({llm.engine.num_kv_blocks} KV blocks of {llm.engine.config.block_size} tokens)")
    start = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=args.max_tokens, temperature=0))
    elapsed = time.perf_counter() - start
    for o in outs:
        print(f"{o.prompt!r} -> {o.text!r} [{o.finish_reason}]")
    n = sum(len(o.token_ids) for o in outs)
    print(f"{n} tokens in {elapsed:.2f}s ({n / elapsed:.0f} tok/s). The built-in weights are "
          "random, so the text is too.")


if __name__ == "__main__":
    main()

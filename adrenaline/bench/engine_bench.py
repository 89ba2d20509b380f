"""Offline engine throughput: adrenaline vs HF transformers vs vLLM CPU, side by side.

Every system gets the same prompts (random token ids), greedy decoding with
ignore_eos, a warm-up run first, and is timed on the full batch. vLLM runs
in its own venv (see vllm_venv.py); its row is skipped with a message when it
cannot be installed.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from adrenaline.bench.report import print_table, result_header, write_result
from adrenaline.bench.workloads import random_token_prompts


def _row(system: str, num_tokens: int, elapsed: float, **extra) -> dict:
    return {"system": system, "output_tok_s": num_tokens / elapsed, "elapsed_s": elapsed,
            "num_output_tokens": num_tokens, **extra}


def bench_adrenaline(model: str, prompts: list[list[int]], output_len: int, dtype: str,
                     threads: int) -> tuple[dict, list[list[int]]]:
    from adrenaline import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, num_threads=threads, max_num_seqs=len(prompts),
              max_num_batched_tokens=max(8192, len(prompts[0])))
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = [o.token_ids for o in outs]
    return _row("adrenaline", sum(map(len, tokens)), elapsed), tokens


def bench_transformers(model_dir: str, prompts: list[list[int]], output_len: int, dtype: str,
                       threads: int) -> tuple[dict, list[list[int]]]:
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed

    def run(batch: torch.Tensor, n: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    run(ids[:4], 4)
    start = time.perf_counter()
    out = run(ids, output_len)
    elapsed = time.perf_counter() - start
    tokens = out[:, ids.shape[1]:].tolist()
    return _row(f"transformers {transformers.__version__}", sum(map(len, tokens)), elapsed), tokens


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of leading tokens that agree (bf16 runs drift apart eventually)."""
    fracs = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fracs.append(n / max(len(x), 1))
    return sum(fracs) / max(len(fracs), 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench engine")
    ap.add_argument("--model", default="small")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="adrenaline,transformers,vllm",
                    help="comma-separated subset of adrenaline,transformers,vllm")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.model.hf_config import load_model_config

    model_dir = str(resolve_model_dir(args.model))
    vocab = load_model_config(model_dir).vocab_size
    prompts = random_token_prompts(args.num_requests, args.input_len, vocab, args.seed)
    systems = args.systems.split(",")
    rows, outputs, skipped = [], {}, {}
    if "adrenaline" in systems:
        row, outputs["adrenaline"] = bench_adrenaline(args.model, prompts, args.output_len,
                                                      args.dtype, args.threads)
        rows.append(row)
    if "transformers" in systems:
        row, outputs["transformers"] = bench_transformers(model_dir, prompts, args.output_len,
                                                          args.dtype, args.threads)
        rows.append(row)
    if "vllm" in systems:
        from adrenaline.bench.vllm_venv import run_vllm_peer

        res = run_vllm_peer(model_dir, args.num_requests, args.input_len, args.output_len,
                            args.seed, args.dtype, timeout_s=1800)
        if res is None:
            skipped["vllm"] = "vLLM CPU could not be installed or run (see stderr)"
        else:
            outputs["vllm"] = res.pop("token_ids", None)
            rows.append(_row(res["system"], res["num_output_tokens"], res["elapsed_s"]))
    if "adrenaline" in outputs:
        for row in rows:
            key = "vllm" if row["system"].startswith("vllm") else row["system"].split()[0]
            if key != "adrenaline" and outputs.get(key):
                row["greedy_prefix_agreement_vs_adrenaline"] = _agreement(outputs["adrenaline"],
                                                                          outputs[key])
    result = {
        **result_header("engine"), "cpu_threads": args.threads, "model": args.model,
        "dtype": args.dtype,
        "workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                     "output_len": args.output_len, "seed": args.seed},
        "rows": rows, "skipped": skipped,
    }
    _print_table(result)
    write_result(result, args.out)
    return result


def _print_table(result: dict) -> None:
    w = result["workload"]
    print(f"\nengine benchmark: {result['model']} {result['dtype']}, {w['num_requests']} x "
          f"({w['input_len']} -> {w['output_len']}), {result['cpu_threads']} threads")
    base = next((r["output_tok_s"] for r in result["rows"] if r["system"] == "adrenaline"), None)
    rows = [{**r, "vs": r["output_tok_s"] / base if base else None} for r in result["rows"]]
    print_table(rows, [("output_tok_s", "output tok/s", 14, 1), ("elapsed_s", "elapsed s", 11, 2),
                       ("vs", "x adrenaline", 14, 2)], label=("system", 28))
    for name, why in result["skipped"].items():
        print(f"{name:<28}skipped: {why}")
    sys.stdout.flush()

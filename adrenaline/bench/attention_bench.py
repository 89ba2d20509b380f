"""The CPU decode kernel alone, per KV token, on pools laid out as fresh and as served.

``python -m adrenaline.bench attention``: SmolLM2's attention (9 query heads over 3 KV
heads of 64, bfloat16, 30 layers), ``--batch`` sequences of ``--context`` tokens, one
thread. For each block size, the sequences' pages lie either consecutive in the pool (a
fresh pool) or in a seeded random order (as decode growth leaves a served pool), in
memory advised for huge pages (the pool's own, engine/kv_pool.py) or in plain 4 KiB
pages. ``--kernel-source FILE`` times another version of csrc/paged_decode.cpp beside the
built one, e.g. an earlier commit's (``git show REV:adrenaline/kernels/csrc/paged_decode.cpp``).
Each figure is the fastest of ``--repeats`` passes over all layers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch

from adrenaline.bench.report import print_table, result_header, write_result

HQ, HKV, D, LAYERS = 9, 3, 64, 30


def _kernels(alt_source: str | None) -> dict:
    from adrenaline.kernels.cpu_extension import FLAGS, paged_decode_module

    kernels = {"built": paged_decode_module().paged_decode}
    if alt_source:
        from torch.utils.cpp_extension import load

        digest = hashlib.sha1(open(alt_source, "rb").read()).hexdigest()[:10]
        kernels[os.path.basename(alt_source)] = load(f"paged_decode_alt_{digest}", [alt_source],
                                                     extra_cflags=FLAGS).paged_decode
    return kernels


def _pages(shape: tuple[int, ...], huge: bool, seed: int) -> torch.Tensor:
    from adrenaline.engine.kv_pool import zeroed_pages

    pages = zeroed_pages(shape, torch.bfloat16, "cpu") if huge else \
        torch.zeros(shape, dtype=torch.bfloat16)
    pages.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return pages


def time_kernel(kernel, k, v, tables, lens, q, repeats: int) -> float:
    """Seconds of the fastest pass of ``kernel`` over every layer's pages."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in range(len(k)):
            kernel(q, k[layer], v[layer], tables, lens, D ** -0.5)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench attention")
    ap.add_argument("--batch", type=int, default=17)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--pool-tokens", type=int, default=36864)
    ap.add_argument("--block-sizes", default="16,64,256")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--core", type=int, default=None, help="pin this process to one core")
    ap.add_argument("--kernel-source", default=None,
                    help="another paged_decode.cpp to time beside the built kernel")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    b, c = args.batch, args.context
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    for bs in block_sizes:
        if b * -(-c // bs) > args.pool_tokens // bs:
            raise SystemExit(f"--pool-tokens {args.pool_tokens} holds fewer than {b} x {c} "
                             f"tokens in {bs}-token blocks")
    kernels = _kernels(args.kernel_source)
    q = torch.randn(b, HQ, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    lens = torch.full((b,), c, dtype=torch.int64)
    rows = []
    for bs in block_sizes:
        num_blocks, width = args.pool_tokens // bs, -(-c // bs)
        seeded = torch.Generator().manual_seed(0)
        order = {"consecutive": torch.arange(num_blocks),
                 "scattered": torch.randperm(num_blocks, generator=seeded)}
        for huge in (True, False):
            shape = (HKV, num_blocks, bs, D)
            k = [_pages(shape, huge, 2 * i) for i in range(LAYERS)]
            v = [_pages(shape, huge, 2 * i + 1) for i in range(LAYERS)]
            for layout, blocks in order.items():
                tables = blocks[:b * width].to(torch.int32).reshape(b, width).contiguous()
                for name, kernel in kernels.items():
                    s = time_kernel(kernel, k, v, tables, lens, q, args.repeats)
                    rows.append({"kernel": name, "block_size": bs,
                                 "pages": "huge" if huge else "4k", "layout": layout,
                                 "ms_per_step": 1e3 * s, "us_per_kv_token": 1e6 * s / (b * c)})
            del k, v
    for r in rows:
        r["label"] = f"{r['kernel'][:14]} bs={r['block_size']} {r['pages']} {r['layout']}"
    print(f"\nCPU decode kernel: {b} sequences x {c} tokens, SmolLM2 heads, bf16, "
          f"{LAYERS} layers, one thread")
    print_table(rows, [("ms_per_step", "ms/step", 9, 1), ("us_per_kv_token", "us/token", 9, 2)],
                label=("label", 40))
    result = {**result_header("attention"), "batch": b, "context": c,
              "pool_tokens": args.pool_tokens, "rows": rows}
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()

"""``python -m adrenaline.bench <benchmark> [options]``."""

from __future__ import annotations

import sys

BENCHMARKS = {
    "engine": "adrenaline.bench.engine_bench",
    "serve": "adrenaline.bench.serve_bench",
    "serving": "adrenaline.bench.serving",
    "offload": "adrenaline.bench.offload_bench",
    "exchange": "adrenaline.bench.exchange_bench",
    "attention": "adrenaline.bench.attention_bench",
    "roofline": "adrenaline.bench.roofline",
    "grammar": "adrenaline.bench.grammar_bench",
    "gpu-check": "adrenaline.bench.gpu_check.run",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m adrenaline.bench {{{','.join(BENCHMARKS)}}} [options]",
              file=sys.stderr)
        sys.exit(2)
    import importlib

    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()

"""What every benchmark's JSON starts with, and how it is written."""

from __future__ import annotations

import json
import os
import platform
from datetime import date


def result_header(benchmark: str) -> dict:
    """Benchmark name, date and machine: the facts docs/BENCHMARKS.md quotes with each table."""
    return {"benchmark": benchmark, "date": date.today().isoformat(),
            "machine": platform.platform(), "cpu_count": os.cpu_count()}


def write_result(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

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


def print_table(rows: list[dict], cols: list[tuple[str, str, int, int]],
                label: tuple[str, int] = ("system", 11)) -> None:
    """One line per row: the label column, then each (key, header, width, decimals) column.

    A missing or None value prints as "-".
    """
    key, width = label
    print(f"{key:<{width}}" + "".join(f"{h:>{wd}}" for _, h, wd, _ in cols))
    for r in rows:
        cells = "".join(f"{r[k]:>{wd}.{dp}f}" if r.get(k) is not None else f"{'-':>{wd}}"
                        for k, _, wd, dp in cols)
        print(f"{str(r[key]):<{width}}" + cells)


"""`bench attention`: the CPU kernel per KV token on fresh and served page layouts."""

from __future__ import annotations

import json

import pytest
import torch

needs_kernel = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                  reason="the CPU kernel needs AVX-512")


@needs_kernel
def test_every_layout_and_page_kind_is_timed_for_each_kernel(tmp_path):
    from adrenaline.bench.attention_bench import main

    # The built kernel's own source as the other one: two kernels, same bits.
    from adrenaline.kernels.cpu_extension import SOURCE

    out = tmp_path / "a.json"
    result = main(["--batch", "2", "--context", "100", "--pool-tokens", "1024",
                   "--block-sizes", "16,64", "--repeats", "1", "--kernel-source", str(SOURCE),
                   "--out", str(out)])
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # block sizes x page kinds x layouts x kernels
    assert {(r["block_size"], r["pages"], r["layout"]) for r in rows} == {
        (bs, p, layout) for bs in (16, 64) for p in ("huge", "4k")
        for layout in ("consecutive", "scattered")}
    assert {r["kernel"] for r in rows} == {"built", "paged_decode.cpp"}
    assert all(r["us_per_kv_token"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"] == rows


def test_a_pool_too_small_for_the_batch_is_refused(tmp_path):
    from adrenaline.bench.attention_bench import main

    with pytest.raises(SystemExit, match="holds fewer than 4 x 300"):
        main(["--batch", "4", "--context", "300", "--pool-tokens", "1024",
              "--block-sizes", "64", "--out", str(tmp_path / "a.json")])

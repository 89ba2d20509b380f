"""The roofline benchmark runs at toy scale and its shares follow from its measurements."""

from __future__ import annotations

import json

import pytest

from adrenaline.bench.roofline import main


def test_roofline_rows(tmp_path):
    out = tmp_path / "roofline.json"
    main(["--model", "tiny", "--dtype", "float32", "--batches", "1,2", "--prompt-len", "8",
          "--steps", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["copy_bandwidth_gbs"] > 0 and result["matmul_peak_gflops"]["float32"] > 0
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:
        assert r["step_ms"] > 0
        assert r["bandwidth_share"] == pytest.approx(
            r["achieved_gbs"] / result["copy_bandwidth_gbs"])
        assert r["bytes_per_step"] > result["weight_bytes"]  # weights plus the batch's KV

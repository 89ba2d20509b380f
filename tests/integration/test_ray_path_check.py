"""The device's Ray path check (scripts/gpu_check.sh --ray) in its CPU dry run.

gpu-1gpu.yaml's layout (prefill + executor + decode, load_aware) on CPU at tiny sizes:
the served greedy texts must equal the offline engine's, with requests offloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ray_path_check_dry_run(ray_cluster, tmp_path):
    from adrenaline.bench.ray_path_check import main

    rc = main(["--cpu", "--config", str(ROOT / "serve_configs" / "gpu-1gpu.yaml"),
               "--out", str(tmp_path), "--num-requests", "8"])
    result = json.loads((tmp_path / "ray_path.json").read_text())
    assert rc == 0 and result["status"] == "ok", result
    assert result["equal"] == result["requests"] == 8
    assert result["executor_steps"] > 0  # the small decode pool made load_aware offload
    assert result["kv_sound"] and result["kv_blocks_left"] == 0 and not result["failed"]
    assert result["args"]["executor"]["enabled"] and result["args"]["device"] == "cpu"

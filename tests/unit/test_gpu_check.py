"""The GPU check script runs on CPU in --dry-run, without the serving stack (as on the device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The device machine has no Ray, FastAPI or Locust: the check must not import them.
_RUN = """
import sys
for name in ("ray", "fastapi", "starlette", "uvicorn", "locust"):
    sys.modules[name] = None
from adrenaline.bench.gpu_check.run import main
main(["--dry-run", "--out", sys.argv[1]])
"""


def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = result["stages"]
    assert list(stages) == ["env", "ceilings", "kernels", "attn_bw", "engine", "offload",
                           "offload_tput", "nccl"]
    assert {n: s["status"] for n, s in stages.items()} == {n: "ok" for n in stages}
    assert stages["kernels"]["result"]["max_rel_err"] < 2e-2
    assert all(r["kv_append_exact"] for r in stages["kernels"]["result"]["rows"])
    exact = stages["offload"]["result"]["exact"]
    assert exact["equal"] == exact["requests"] and exact["executor_steps"] > 0
    # The table is printed last.
    assert proc.stdout.rstrip().splitlines()[-1].startswith("nccl")


def test_gpu_check_script_dry_run():
    env = {**os.environ, "OUT": "/tmp/adrenaline-gpu-check-dry", "PY": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--stages", "env,kernels"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels      ok" in proc.stdout

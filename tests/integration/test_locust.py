"""Load tools against the real app ("tiny", 1 prefill + 1 decode, route "/").

- loadtests/locustfile.py, headless for 15 s: every completions row has requests and zero
  failures, and streamed requests report TTFT (and TPOT) rows of their own.
- the serving benchmark client (adrenaline.bench.serving) over HTTP: every request succeeds,
  output counts are exact (ignore_eos), metrics are consistent.

Only one app may own route "/": this module deletes its app when it ends.
"""

from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.kv_checks import assert_kv_sound
from tests.integration.serve_helpers import free_port, serve_http_port

httpx = pytest.importorskip("httpx")

APP_NAME = "locust"
ROOT = Path(__file__).resolve().parents[2]
LOCUST = Path(sys.executable).parent / "locust"


@pytest.fixture(scope="module")
def base_url(ray_cluster):
    from ray import serve

    from adrenaline.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # no-op if running
    serve.run(build_app({"model": "tiny"}), name=APP_NAME, route_prefix="/")
    url = f"http://127.0.0.1:{serve_http_port()}"
    deadline = time.monotonic() + 120
    while httpx.get(url + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the app never became healthy"
        time.sleep(0.5)
    yield url
    assert_kv_sound(serve.get_deployment_handle("Router", app_name=APP_NAME))
    serve.delete(APP_NAME)


@pytest.mark.skipif(not LOCUST.exists(), reason="locust is not installed in this venv")
def test_locust_headless(base_url, tmp_path):
    prefix = tmp_path / "run"
    proc = subprocess.run(
        [str(LOCUST), "-f", str(ROOT / "loadtests/locustfile.py"), "--headless", "-u", "4",
         "-r", "4", "-t", "15s", "--host", base_url, "--csv", str(prefix),
         "--exit-code-on-error", "0", "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    completions = [r for r in rows if r["Name"].startswith("completions")]
    assert completions, rows
    assert sum(int(r["Request Count"]) for r in completions) > 0
    for r in rows:
        assert int(r["Failure Count"]) == 0, (r, proc.stderr[-3000:])
    assert any(r["Name"].startswith("multi-turn [turn") for r in rows), rows  # MultiTurnUser
    ttft = [r for r in rows if r["Type"] == "TTFT"]
    assert ttft and all(float(r["Average Response Time"]) > 0 for r in ttft)
    assert any(r["Type"] == "TPOT" for r in rows)


def test_serving_benchmark_client(base_url):
    from adrenaline.bench.serving import run_benchmark
    from adrenaline.bench.serving_metrics import Slo, compute_metrics
    from adrenaline.bench.serving_workloads import random_requests

    reqs = random_requests(6, input_len=32, output_len=8, vocab_size=4096, range_ratio=0.5)
    timelines, duration = asyncio.run(run_benchmark(base_url, "tiny", reqs, request_rate=20.0,
                                                    max_concurrency=4, progress=False))
    assert all(t.success for t in timelines), [t.error for t in timelines]
    assert [t.n_out for t in timelines] == [r.output_len for r in reqs]
    assert [t.prompt_tokens for t in timelines] == [r.prompt_len for r in reqs]
    m = compute_metrics(timelines, duration, Slo(ttft_ms=1e9, tpot_ms=1e9))
    assert m.completed == 6 and m.num_failed == 0
    assert m.request_goodput == pytest.approx(m.request_throughput)
    assert 0 < m.ttft_ms.mean <= m.e2e_ms.mean

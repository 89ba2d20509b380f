"""Reliability soak: Locust load against the app while actors are killed (kill -9) or stopped
(SIGSTOP: a hang) periodically.

    .venv/bin/python loadtests/soak.py --minutes 10 --kill-every 45 --users 8 \
        --out soak-results.json

Starts its own Ray cluster and the app (1 prefill + its attention executor, 1 decode,
static offload ratio 0.5, "tiny") on a free port, runs loadtests/soak_locustfile.py
headless for ``--minutes``, and every ``--kill-every`` seconds kills one actor (decode,
executor, prefill in turn) with SIGKILL, then, in the next round, stops one with SIGSTOP
(the heartbeat must find the hang within ``recovery.hang_timeout_s``). At the end: Locust's totals (requests sent,
failures by kind, mismatched outputs), each kill, how long until it was detected and until
its replacement served (requests on the surviving actors stream on meanwhile), the
router's counters, and the KV audit of the idle cluster; printed and written
as JSON.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_ARGS = {"model": "tiny", "executor": {"enabled": True, "engine": {"kv_cache_tokens": 4096}},
            "policy": "static", "policy_options": {"ratio": 0.5},
            "recovery": {"hang_timeout_s": 10}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the app never became healthy")
        time.sleep(0.5)


def _alive(pid: int, wait_s: float = 10.0) -> bool:
    """Does ``pid`` still exist ``wait_s`` after its replacement (a kill takes a moment)?"""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def _totals(prefix: Path) -> dict:
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    agg = rows["Aggregated"]
    failures: dict[str, int] = {}
    with open(f"{prefix}_failures.csv") as f:
        for r in csv.DictReader(f):
            failures[r["Error"]] = failures.get(r["Error"], 0) + int(r["Occurrences"])
    sent, failed = int(agg["Request Count"]), int(agg["Failure Count"])
    return {"requests_sent": sent, "completed_ok": sent - failed, "failed": failed,
            "mismatched": sum(n for e, n in failures.items() if "mismatch" in e),
            "failures_by_kind": failures,
            "by_name": {n: {"sent": int(r["Request Count"]), "failed": int(r["Failure Count"]),
                            "p50_ms": float(r["50%"] or 0), "p99_ms": float(r["99%"] or 0)}
                        for n, r in rows.items() if n != "Aggregated"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=45.0, help="seconds between kills")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--out", default="soak-results.json")
    a = ap.parse_args()

    import ray
    from ray import serve

    from adrenaline.serve.app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
    serve.run(build_app(APP_ARGS), name="adrenaline", route_prefix="/")
    from tests.integration.serve_helpers import serve_http_port

    url = f"http://127.0.0.1:{serve_http_port()}"
    _wait_healthy(url)
    router = serve.get_deployment_handle("Router", app_name="adrenaline")
    prefix = Path(a.out).with_suffix("")
    locust = subprocess.Popen(
        [str(Path(sys.executable).parent / "locust"), "-f",
         str(ROOT / "loadtests/soak_locustfile.py"), "--headless", "-u", str(a.users), "-r",
         str(a.users), "-t", f"{int(a.minutes * 60)}s", "--host", url, "--csv", str(prefix),
         "--exit-code-on-error", "0", "--only-summary"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(f"{prefix}_locust.log", "w"))
    kills = []
    start = time.monotonic()
    events = itertools.cycle([(role, sig) for sig in (signal.SIGKILL, signal.SIGSTOP)
                              for role in ("decode", "executor", "prefill")])
    try:
        while locust.poll() is None:
            time.sleep(a.kill_every)
            if locust.poll() is not None or time.monotonic() - start > a.minutes * 60 - 20:
                break  # leave the last seconds for the load alone
            role, sig = next(events)
            pid = router.worker_pids.remote().result()[role][0]
            before = router.stats.remote().result()
            t_kill = time.monotonic()
            os.kill(pid, sig)
            detected = None
            # Detected: the loss is counted; serving again: its replacement (of the actor,
            # or of the whole cluster) serves.
            while (s := router.stats.remote().result())["num_recoveries"] == \
                    before["num_recoveries"] or s["state"] != "up":
                if detected is None and s["num_losses"] != before["num_losses"]:
                    detected = time.monotonic() - t_kill
                time.sleep(0.1)
            serving_again = time.monotonic() - t_kill
            detected = serving_again if detected is None else detected
            stopped_left = _alive(pid)
            if stopped_left:  # must not happen: recovery kills the hung process
                os.kill(pid, signal.SIGKILL)
            kills.append({"at_s": round(t_kill - start, 1), "role": role, "pid": pid,
                          "signal": signal.Signals(sig).name,
                          "detected_after_s": round(detected, 2),
                          "serving_again_after_s": round(serving_again, 2),
                          "process_left_behind": stopped_left})
            print(f"[soak] t={kills[-1]['at_s']}s {kills[-1]['signal']} {role} (pid {pid}); "
                  f"detected after {kills[-1]['detected_after_s']} s; serving again after "
                  f"{kills[-1]['serving_again_after_s']} s", flush=True)
        locust.wait(timeout=a.minutes * 60 + 300)
        duration = time.monotonic() - start
        deadline = time.monotonic() + 60
        while True:  # idle: every page free, every accounting sound
            reports = router.check_kv.remote().result()
            problems = [p for r in reports for p in r.problems] + \
                [f"{r.role}[{r.index}] holds {r.num_used} pages" for r in reports if r.num_used]
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        result = {"command": " ".join(["python", "loadtests/soak.py"] + sys.argv[1:]),
                  "app_args": APP_ARGS, "users": a.users, "duration_s": round(duration, 1),
                  **_totals(prefix), "kills": kills,
                  "router": router.stats.remote().result(), "kv_problems_after": problems}
    finally:
        if locust.poll() is None:
            locust.terminate()
        serve.shutdown()
        ray.shutdown()
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("by_name", "app_args")},
                     indent=2))


if __name__ == "__main__":
    main()

"""Sweep mode of the serving benchmark: every system at every request rate, side by side.

A system is a *launcher*: a context manager that starts it, yields its ``Endpoint`` and stops
it on exit, so systems run one after another on the same cores and see the same requests.
``run_sweep`` warms each system up, then calls ``bench(system, endpoint, rate)`` at every rate.

Launchers:
- ``adrenaline_system``: an app (policy none, static or load_aware) in this process's Ray
  cluster (``ray_serve``), on route "/"; its endpoint exposes the router's placement counters;
- ``vllm_server.vllm_openai_server``: vLLM CPU's OpenAI server from its own venv.

A launcher that cannot start its system raises ``SystemUnavailable``; the sweep records the
reason under ``skipped`` and goes on with the next system. Invariant: each system is stopped
(its app deleted, its process group ended) before the next one starts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

# system name -> (policy, policy options) of the adrenaline systems; the offload benchmark's too
ADRENALINE_SYSTEMS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "static": ("static", {"ratio": 0.75}),
    "load_aware": ("load_aware", {"tpot_slo_ms": 250}),
}
VLLM_SYSTEM = "vllm"


class SystemUnavailable(RuntimeError):
    """A system cannot run here; the message says why."""


@dataclass
class Endpoint:
    base_url: str
    model: str  # the model name requests carry
    # Placement counters {"num_placed", "num_offloaded"} since start; None: not an adrenaline app.
    stats: Callable[[], dict] | None = None


Launcher = Callable[[], AbstractContextManager[Endpoint]]


def offload_ratio(before: dict, after: dict) -> float:
    """Share of the requests placed between two stats() calls that were offloaded."""
    placed = after["num_placed"] - before["num_placed"]
    return (after["num_offloaded"] - before["num_offloaded"]) / placed if placed > 0 else 0.0


def run_sweep(launchers: dict[str, Launcher], rates: list[float],
              bench: Callable[[str, Endpoint, float], dict],
              warmup: Callable[[Endpoint], None] | None = None
              ) -> tuple[list[dict], dict[str, str]]:
    """(rows in system, then rate order; {system: why it was skipped})."""
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    for name, launch in launchers.items():
        try:
            with launch() as ep:
                if warmup is not None:
                    warmup(ep)
                for rate in rates:
                    before = ep.stats() if ep.stats else None
                    row = {"system": name, **bench(name, ep, rate)}
                    if before is not None:
                        row["offload_ratio"] = offload_ratio(before, ep.stats())
                    rows.append(row)
        except SystemUnavailable as e:
            print(f"skipping {name}: {e}", flush=True)
            skipped[name] = str(e)
    return rows, skipped


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def sweep_table(rows: list[dict]) -> str:
    """The sweep as a markdown table: throughput, goodput, latencies, offloading, prefill-side use.

    ``offload`` is the share of the run's requests placed offloaded (router counters); the
    ``peak`` columns come from the /metrics samples: the highest KV use of any executor or
    prefill instance, and the highest executor attention bandwidth over one interval."""
    head = ("| system | rate req/s | req/s | output tok/s | goodput req/s | TTFT p50 ms | "
            "TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | offload | peak prefill-side KV use | "
            "peak executor GB/s |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        m, samples = r["metrics"], r.get("samples") or []
        side = [v for x in samples for k, v in x.get("kv_use", {}).items()
                if k.startswith(("prefill", "executor"))]
        gbs = [v for x in samples for v in x.get("attn_gbs", {}).values()]
        cells = [r["system"], f"{r['request_rate']:g}", f"{m['request_throughput']:.2f}",
                 f"{m['output_throughput']:.1f}", _fmt(m.get("request_goodput"), ".2f"),
                 f"{m['ttft_p50_ms']:.0f}", f"{m['ttft_p99_ms']:.0f}",
                 f"{m['tpot_p50_ms']:.1f}", f"{m['tpot_p99_ms']:.1f}",
                 _fmt(r.get("offload_ratio"), ".2f"), _fmt(max(side, default=None), ".2f"),
                 _fmt(max(gbs, default=None), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wait_healthy(base_url: str, timeout_s: float = 300,
                 alive: Callable[[], bool] = lambda: True) -> None:
    """Until ``GET /health`` answers 200; SystemUnavailable on timeout or when not alive()."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base_url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not alive():
            raise SystemUnavailable(f"the server behind {base_url} exited before it was healthy")
        if time.monotonic() > deadline:
            raise SystemUnavailable(f"{base_url} was not healthy within {timeout_s:.0f} s")
        time.sleep(0.5)


@contextmanager
def ray_serve(num_cpus: int, port: int) -> Iterator[None]:
    """This process's Ray cluster with Serve's proxy on 127.0.0.1:port, shut down on exit."""
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def adrenaline_system(app_args: dict, name: str, port: int, model: str) -> Iterator[Endpoint]:
    """One adrenaline app on route "/" of a running ``ray_serve``; deleted on exit."""
    from ray import serve

    from adrenaline.serve.app import build_app

    app = f"sweep-{name}"
    serve.run(build_app(app_args), name=app, route_prefix="/")
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_healthy(base_url)
        router = serve.get_deployment_handle("Router", app_name=app)
        yield Endpoint(base_url, model, stats=lambda: router.stats.remote().result())
    finally:
        serve.delete(app)

"""The serving benchmark on one node and on three (head; prefill + executor; decode).

    python -m tests.multinode.bench --out docs/bench-multinode.json [serving bench args]  (root)

Both layouts run the app of serve_configs/multinode.yaml (static, ratio 0.5) in netns
clusters (netns_cluster.py) on this machine; the 1-node cluster's head offers every role's
resource. The same requests at the same rate go to each through
``python -m adrenaline.bench serving``, run inside the head's namespace. The layouts run
one after another (never together: they share the machine's cores); the JSON holds both
results and the ratio of their output throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from adrenaline.bench.report import print_table, result_header, write_result
from tests.multinode.app import DECODE, HEAD, PREFILL, URL, config, deploy
from tests.multinode.netns_cluster import NetnsCluster, NodeSpec

ALL_ROLES = NodeSpec("head", 1, {**HEAD.resources, **PREFILL.resources, **DECODE.resources})
LAYOUTS = {"1-node": [ALL_ROLES], "3-node": [HEAD, PREFILL, DECODE]}


def bench_layout(nodes: list[NodeSpec], model: str, bench_args: list[str]) -> dict:
    cluster = NetnsCluster(nodes).up()
    try:
        cfg = config()
        cfg["applications"][0]["args"]["model"] = model
        deploy(cluster, cfg, timeout_s=600)
        out = cluster.root / "serving.json"
        argv = [sys.executable, "-m", "adrenaline.bench", "serving", "--base-url", URL,
                "--model", model, "--no-progress", "--out", str(out), *bench_args]
        load_before = os.getloadavg()  # the machine is shared: record how busy it was
        r = cluster.run(cluster.head, argv, check=False, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"serving bench failed:\n{r.stdout}\n{r.stderr[-4000:]}")
        print(r.stdout)
        return {**json.loads(out.read_text()), "loadavg_before": load_before,
                "loadavg_after": os.getloadavg()}
    finally:
        cluster.down()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--model", default="small")
    a, bench_args = ap.parse_known_args()
    # The 1-node sweep's requests (docs/BENCHMARKS.md), at one rate both layouts keep up with.
    bench_args = bench_args or ["--num-prompts", "32", "--input-len", "128", "--output-len",
                                "64", "--request-rate", "2", "--seed", "0"]
    rows, results = [], {}
    for name in a.layouts.split(","):
        res = bench_layout(LAYOUTS[name], a.model, bench_args)
        results[name] = res
        rows.append({"layout": name, **res["metrics"]})
    result = {**result_header("serving-multinode"), "model": a.model, "bench_args": bench_args,
              "layouts": results}
    if len(rows) == 2:
        result["output_throughput_ratio"] = (rows[1]["output_throughput"]
                                             / rows[0]["output_throughput"])
    write_result(result, a.out)
    print_table(rows, [("output_throughput", "out tok/s", 11, 1),
                       ("request_throughput", "req/s", 8, 2),
                       ("ttft_median_ms", "TTFT p50", 10, 1), ("ttft_p99_ms", "TTFT p99", 10, 1),
                       ("tpot_median_ms", "TPOT p50", 10, 1), ("tpot_p99_ms", "TPOT p99", 10, 1),
                       ("completed", "done", 6, 0)], label=("layout", 8))


if __name__ == "__main__":
    main()

"""The GPU path checked in one run: kernels, bandwidth, engine roofline, CUDA graphs, offload.

    python -m adrenaline.bench gpu-check --out DIR            # on a CUDA machine
    python -m adrenaline.bench gpu-check --dry-run --out DIR  # on CPU (CI): same stages, tiny sizes

Stages (each one timed, its failure recorded without stopping the rest):
  env          torch / CUDA / device / flashinfer / cupy versions
  ceilings     device copy bandwidth (read + write) and bf16 matmul rate
  kernels      the flashinfer backend against the torch backend in float32 (decode,
               prefill with cached context, KV append) for several head shapes
  attn_bw      flashinfer paged decode: KV bytes read per second vs copy bandwidth,
               on the whole device and on green-context SM partitions (executor share)
  engine       a random ~1B Llama in bf16: decode step time with and without CUDA
               graphs at several batch sizes, bandwidth-roofline share, and the
               graph replay's logits against the eager step's
  offload      prefill + attention executor + decode on one device (engine/colocated.py):
               greedy tokens against the offline engine (float32, torch attention:
               exact; bf16, flashinfer, executor on an SM partition: reported)
  offload_tput decode throughput with the decode KV budget capping the batch: all local
               (none) vs local-then-executor placement (offload), side by side
  nccl         the cupy NCCL communicator up to what one GPU allows (id, 1-rank world)

In --dry-run every stage runs on CPU with tiny shapes and the torch backend in
place of flashinfer (the GPU-only parts say "skipped"), so the script cannot rot.
A short table is printed last; gpu_check.json (and the log) go to --out.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from adrenaline.bench.gpu_check.attn_bw import stage_attn_bw
from adrenaline.bench.gpu_check.ceilings import stage_ceilings
from adrenaline.bench.gpu_check.common import make_plan
from adrenaline.bench.gpu_check.engine import stage_engine
from adrenaline.bench.gpu_check.env import stage_env
from adrenaline.bench.gpu_check.kernels import stage_kernels
from adrenaline.bench.gpu_check.nccl import stage_nccl
from adrenaline.bench.gpu_check.offload import stage_offload
from adrenaline.bench.gpu_check.offload_tput import stage_offload_tput
from adrenaline.bench.report import result_header


STAGES = [("env", stage_env), ("ceilings", stage_ceilings), ("kernels", stage_kernels),
          ("attn_bw", stage_attn_bw), ("engine", stage_engine), ("offload", stage_offload),
          ("offload_tput", stage_offload_tput), ("nccl", stage_nccl)]


def _verdict(result) -> str:
    if isinstance(result, dict) and result.get("ok") is False:
        return "MISMATCH"
    return "ok"


def summary_lines(results: dict) -> list[str]:
    """The short table printed last."""
    lines = [f"{'stage':<13}{'status':<10}{'seconds':>8}  key numbers"]
    for name, r in results["stages"].items():
        res = r.get("result") or {}
        key = ""
        if name == "env" and res:
            key = f"{res.get('device', 'cpu')} torch {res['torch']} flashinfer {res.get('flashinfer')}"
        elif name == "ceilings" and res:
            key = f"copy {res['copy_gbs']:.0f} GB/s, bf16 matmul {res['bf16_matmul_tflops']:.1f} TFLOP/s"
        elif name == "kernels" and res:
            key = (f"{len(res['rows'])} attention cases, max rel err {res['max_rel_err']:.2e}; "
                   f"{len(res['ops'])} fused ops, max rel err {res['ops_max_rel_err']:.2e}")
        elif name == "attn_bw" and res:
            share = res["share_of_copy_bw"]
            key = f"{res['gbs']:.0f} GB/s" + (f" = {share:.2f} of copy bw" if share else "")
            if isinstance(res["partitions"], list):
                key += "; " + ", ".join(f"{p['sms']} SMs {p['vs_full_device']:.2f}x"
                                        for p in res["partitions"])
        elif name == "engine" and res:
            key = "; ".join(f"b{x['batch']} {x['eager_ms']:.1f}"
                            + (f"/{x['graph_ms']:.1f}ms graph" if x["graph_ms"] else "ms")
                            + (f" (replay {x['replay_ms']:.2f})" if "replay_ms" in x else "")
                            + (f" torch-ops {x['torch_ops_graph_ms']:.1f} (replay "
                               f"{x['torch_ops_replay_ms']:.2f})" if "torch_ops_graph_ms" in x
                               else "")
                            + (f" {x['roofline_share']:.2f} bw" if x["roofline_share"] else "")
                            for x in res["rows"])
        elif name == "offload" and res:
            ex = res["exact"]
            key = f"fp32 {ex['equal']}/{ex['requests']} equal"
            if isinstance(res.get("bf16_flashinfer"), dict):
                bf = res["bf16_flashinfer"]
                key += f"; bf16 {bf['equal']}/{bf['requests']} equal"
        elif name == "offload_tput" and res:
            rw = res["rows"]
            key = "; ".join(f"{k} {v['output_tok_s']:.0f} tok/s (batch {v['mean_decode_batch']:.0f}"
                            + (f", {res['speedup'][k]:.2f}x, same tokens "
                               f"{res['same_tokens_as_none'][k]}/{res['requests']})"
                               if k != "none" else ")")
                            for k, v in rw.items())
        elif name == "nccl" and res:
            key = res.get("status") or res.get("one_rank_world", "")
        lines.append(f"{name:<13}{r['status']:<10}{r['seconds']:>8.1f}  {key}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench gpu-check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch backend")
    ap.add_argument("--out", required=True, help="directory for gpu_check.json")
    ap.add_argument("--stages", default=",".join(n for n, _ in STAGES))
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --dry-run")
    plan = make_plan(args.dry_run)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = args.stages.split(",")
    results = {**result_header("gpu-check"), "dry_run": args.dry_run, "stages": {}}
    ctx: dict = {}
    for name, fn in STAGES:
        if name not in wanted:
            continue
        print(f"[gpu-check] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn(plan, ctx)
            entry = {"status": _verdict(res), "result": res}
        except Exception as e:
            entry = {"status": "ERROR", "error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()}
            print(entry["traceback"], flush=True)
        entry["seconds"] = time.perf_counter() - t0
        results["stages"][name] = entry
        print(f"[gpu-check] {name}: {entry['status']} in {entry['seconds']:.1f}s "
              f"{json.dumps(entry.get('result'), default=str)[:2000]}", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + "\n".join(summary_lines(results)), flush=True)
    return results


if __name__ == "__main__":
    main()

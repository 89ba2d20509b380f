"""The per-layer exchange between a decode worker and its executor, over gloo and shm.

Two measurements, each between two real processes (the decode side here, the
executor side a child process), for every transport in one run:

1. ``exchange``: the round trip alone, at SmolLM2's shapes. Per layer the decode
   side posts the packed q/k/v of ``n`` requests and the receive of their
   output; the executor answers with a precomputed output. Median and p90 per
   layer, for n = 1, 8, 32.
2. ``step``: a whole decode step of ``batch`` requests at ``context`` tokens, all
   local, against the same batch with half of it offloaded to an executor
   process (its attention on the executor, the exchange over the transport).
   The overhead is (offloaded - local) / local; with the roles pinned to cores
   of their own, the executor's half runs beside the decode step.

``--pin``: decode on core 1, executor on core 0 (as serve_configs/local.yaml).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from adrenaline.bench.report import print_table, result_header, write_result

DECODE_CORE, EXECUTOR_CORE = 1, 0


def _init(kind: str) -> str:
    from adrenaline.transport import find_free_port
    from adrenaline.transport.shm import new_shm_init

    return new_shm_init() if kind == "shm" else f"tcp://127.0.0.1:{find_free_port()}"


def _join(kind: str, rank: int, init: str, ring_bytes: int):
    from adrenaline.transport import make_communicator

    return make_communicator(kind, rank, 2, init, timeout_s=600, capacity_bytes=ring_bytes)


def _pin(core: int | None) -> None:
    torch.set_num_threads(1)
    if core is not None:
        os.sched_setaffinity(0, {core})


def _shapes(model_dir: str) -> tuple[int, int, int, int]:
    from adrenaline.model.hf_config import load_model_config

    mc = load_model_config(model_dir)
    return mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim, mc.num_hidden_layers


# ---- 1. the exchange alone ----

def _answer(kind: str, init: str, model_dir: str, n: int, iters: int, core: int | None) -> None:
    _pin(core)
    hq, hkv, d, _ = _shapes(model_dir)
    comm = _join(kind, 1, init, 4 << 20)
    packed = torch.empty(n, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
    out = torch.randn(n, hq, d).to(torch.bfloat16)  # precomputed: the exchange alone
    for _ in range(iters):
        comm.recv(packed, 0, 3)
        comm.send(out, 0, 4)
    comm.close()


def exchange_round_trip(kind: str, model_dir: str, n: int, iters: int, pin: bool) -> dict:
    hq, hkv, d, _ = _shapes(model_dir)
    init = _init(kind)
    child = mp.get_context("spawn").Process(
        target=_answer, args=(kind, init, model_dir, n, iters, EXECUTOR_CORE if pin else None))
    child.start()
    _pin(DECODE_CORE if pin else None)
    comm = _join(kind, 0, init, 4 << 20)
    packed = torch.randn(n, (hq + 2 * hkv) * d).to(torch.bfloat16)
    out = torch.empty(n, hq, d, dtype=torch.bfloat16)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        recv = comm.irecv(out, 1, 4)
        send = comm.isend(packed, 1, 3)
        recv.wait()
        send.wait()
        times.append(time.perf_counter() - start)
    child.join(timeout=120)
    comm.close()
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    times = sorted(times[iters // 10:])  # past the warm-up
    return {"kind": kind, "n": n, "pinned": pin,
            "median_us": 1e6 * statistics.median(times),
            "p90_us": 1e6 * times[int(0.9 * len(times))]}


# ---- 2. a decode step, all local vs half offloaded ----

def _executor(kind: str, init: str, model: str, n: int, context: int, core: int | None) -> None:
    _pin(core)
    from adrenaline.config import EngineConfig
    from adrenaline.engine.attention_service import AttentionService
    from adrenaline.model.resolve import resolve_model_dir
    from adrenaline.engine.synthetic_batch import service_adopt
    from adrenaline.model.hf_config import load_model_config
    from adrenaline.engine.remote_attention import exchange_message_bytes

    mc = load_model_config(resolve_model_dir(model))
    service = AttentionService(mc, EngineConfig(kv_cache_tokens=n * (context + 512)),
                               torch.bfloat16, torch.device("cpu"))
    service_adopt(service, n, context)
    comm = _join(kind, 1, init, 2 * exchange_message_bytes(mc, torch.bfloat16, 256))
    with torch.inference_mode():
        try:
            while True:
                service.serve_step(comm, 0)
        except RuntimeError:  # the decode side closed the link: done
            pass


def _decode_engine(model: str, batch: int, context: int):
    from adrenaline.config import EngineConfig
    from adrenaline.engine.core import EngineCore

    return EngineCore(model, dtype="bfloat16", device="cpu",
                      config=EngineConfig(kv_cache_tokens=batch * (context + 512),
                                          max_num_seqs=max(batch, 1), num_threads=1,
                                          enable_prefix_caching=False))


def _time_steps(engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def decode_step(kind: str, model: str, batch: int, context: int, steps: int, pin: bool) -> dict:
    from adrenaline.engine.remote_attention import RemoteAttention, exchange_message_bytes
    from adrenaline.engine.synthetic_batch import adopt_local, adopt_offloaded

    _pin(DECODE_CORE if pin else None)
    with torch.inference_mode():
        engine = _decode_engine(model, batch, context)
        adopt_local(engine, batch, context, steps + 2, prefix="all-local")
        local_s = _time_steps(engine, steps)
    del engine
    n_off = batch // 2
    init = _init(kind)
    child = mp.get_context("spawn").Process(
        target=_executor, args=(kind, init, model, n_off, context,
                                EXECUTOR_CORE if pin else None))
    child.start()
    with torch.inference_mode():
        engine = _decode_engine(model, batch, context)
        mc = engine.model_config
        comm = _join(kind, 0, init, 2 * exchange_message_bytes(mc, torch.bfloat16, 256))
        engine.runner.remote = RemoteAttention(comm, [1], mc.num_attention_heads,
                                               mc.num_key_value_heads, mc.head_dim)
        adopt_local(engine, batch - n_off, context, steps + 2, prefix="local")
        adopt_offloaded(engine, list(range(n_off)), context, steps + 2)
        offloaded_s = _time_steps(engine, steps)
        remote = engine.runner.remote
        wait_per_layer = remote.round_trip_s / max(remote.num_round_trips, 1)
    comm.close()
    child.join(timeout=120)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    return {"kind": kind, "pinned": pin, "batch": batch, "context": context,
            "local_step_ms": 1e3 * local_s, "offloaded_step_ms": 1e3 * offloaded_s,
            "overhead": (offloaded_s - local_s) / local_s,
            "remote_wait_per_layer_us": 1e6 * wait_per_layer}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m adrenaline.bench exchange")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--kinds", default="gloo,shm")
    ap.add_argument("--sizes", default="1,8,32", help="offloaded requests per exchange")
    ap.add_argument("--iters", type=int, default=600, help="round trips per exchange row")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per step row")
    ap.add_argument("--pin", default="both", choices=["both", "on", "off"])
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if (os.cpu_count() or 1) < 2 and args.pin != "off":
        raise SystemExit("--pin needs two cores")

    from adrenaline.model.resolve import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    pins = {"both": [False, True], "on": [True], "off": [False]}[args.pin]
    kinds = args.kinds.split(",")
    exchange = [exchange_round_trip(k, model_dir, int(n), args.iters, p)
                for p in pins for n in args.sizes.split(",") for k in kinds]
    steps = [] if args.skip_steps else [
        decode_step(k, args.model, args.batch, args.context, args.steps, p)
        for p in pins for k in kinds]
    result = {**result_header("exchange"), "model": args.model, "exchange": exchange,
              "steps": steps}
    print("\nper-layer exchange (decode posts q/k/v, executor answers a precomputed output)")
    for r in exchange:
        r["label"] = f"{r['kind']} n={r['n']}{' pinned' if r['pinned'] else ''}"
    print_table(exchange, [("median_us", "med us", 9, 0), ("p90_us", "p90 us", 9, 0)],
                label=("label", 20))
    if steps:
        print(f"\ndecode step, batch {args.batch} x {args.context} tokens: all local vs half "
              "offloaded")
        for r in steps:
            r["label"] = f"{r['kind']}{' pinned' if r['pinned'] else ''}"
        print_table(steps, [("local_step_ms", "local ms", 10, 1),
                            ("offloaded_step_ms", "offl ms", 9, 1), ("overhead", "overhd", 8, 2),
                            ("remote_wait_per_layer_us", "wait/lyr us", 12, 0)],
                    label=("label", 14))
    write_result(result, args.out)
    return result

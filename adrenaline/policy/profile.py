"""Start-up profile for load-aware offloading: never hard-coded, always measured.

- decode step time at several batch sizes (synthetic requests on each decode
  worker) -> B_max, the largest batch whose step fits the TPOT SLO;
- memory bandwidth each decode worker and executor reaches with its own
  thread budget (a large tensor copy);
- KV capacities (tokens) of decode workers and executors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterProfile:
    step_time_s: dict[int, float]  # decode batch size -> step seconds (decode instance 0)
    decode_bandwidth_gbs: list[float]
    executor_bandwidth_gbs: list[float]
    decode_capacity_tokens: list[int]
    executor_capacity_tokens: list[int]

    def b_max(self, tpot_slo_s: float) -> int:
        """Largest profiled batch whose decode step fits the TPOT SLO (at least 1)."""
        fitting = [b for b, t in self.step_time_s.items() if t <= tpot_slo_s]
        return max(fitting, default=1)


PROFILE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def profile_cluster(cluster, args) -> ClusterProfile:
    import ray

    decode = cluster.decode
    steps = ray.get(decode[0].profile_steps.remote(list(PROFILE_BATCHES)))
    dec_bw = ray.get([d.measure_bandwidth.remote() for d in decode])
    exe_bw = ray.get([e.measure_bandwidth.remote() for e in cluster.executors])
    return ClusterProfile(
        step_time_s={int(b): t for b, t in steps.items()}, decode_bandwidth_gbs=dec_bw,
        executor_bandwidth_gbs=exe_bw,
        decode_capacity_tokens=[i.num_kv_blocks * i.block_size for i in cluster.decode_info],
        executor_capacity_tokens=list(cluster.executor_capacity_tokens))


def profile_decode_steps(engine, batch_sizes: list[int], prompt_len: int, steps: int
                         ) -> dict[int, float]:
    """Median decode step seconds of ``engine`` (an idle EngineCore) at each batch size.

    Synthetic requests of ``prompt_len`` tokens are prefilled, timed over ``steps``
    decode steps, then aborted, so the engine is left as it was. Batch sizes the
    pool cannot hold are skipped, along with every larger one after them.
    """
    import statistics
    import time

    from adrenaline.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    per_request = engine.block_manager.blocks_for(prompt_len + steps + 2)
    times: dict[int, float] = {}
    for b in batch_sizes:
        if b * per_request > engine.num_kv_blocks:
            break
        ids = [f"profile-{b}-{i}" for i in range(b)]
        for i, rid in enumerate(ids):
            engine.add_request(rid, [10 + (7 * i + t) % 100 for t in range(prompt_len)], params)
        while engine.scheduler.waiting:
            engine.step()  # prefill
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            samples.append(time.perf_counter() - start)
        for rid in ids:
            engine.abort(rid)
        times[b] = statistics.median(samples)
    return times


def measure_copy_bandwidth(num_bytes: int = 256 << 20, repeats: int = 3, device="cpu") -> float:
    """GB/s of a large tensor copy on ``device`` (on CPU, with the calling thread's torch threads)."""
    import time

    import torch

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best / 1e9  # read + write

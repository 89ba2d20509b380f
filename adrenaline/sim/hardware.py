"""Hardware profiles: a device's peaks and the efficiencies fitted to measurements.

Peaks are spec-sheet numbers (GPUs) or measured ceilings (this CPU); the
efficiencies and overheads come from ``python -m adrenaline.sim fit`` and
live in profiles.json next to this file, with the data each was fitted on.
A100-80GB and H100 have no measurements here: they take the H200's fitted
efficiencies and overheads with their own spec-sheet peaks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PROFILES_PATH = Path(__file__).with_name("profiles.json")

# Dense bf16/fp16 tensor-core peaks and HBM bandwidth from the vendors' data sheets (SXM parts).
SPEC_SHEETS: dict[str, dict] = {
    "h200": dict(mem_gib=141 * 1e9 / 2**30, mem_bw_gbs=4800.0, flops_tflops=989.0),
    "h100": dict(mem_gib=80 * 1e9 / 2**30, mem_bw_gbs=3350.0, flops_tflops=989.0),
    "a100-80gb": dict(mem_gib=80 * 1e9 / 2**30, mem_bw_gbs=2039.0, flops_tflops=312.0),
}
DERIVED_FROM_H200 = ("h100", "a100-80gb")


@dataclass(frozen=True)
class HardwareProfile:
    """Step time = overheads + weights / (bw x eff_mem) + linear FLOPs / (peak x eff)
    + KV read (local or offloaded, overlapped per layer) / (bw x eff_attn)."""

    name: str
    mem_gib: float
    mem_bw_gbs: float
    flops_tflops: float
    eff_mem: float = 0.5  # weight streaming, share of mem_bw_gbs
    eff_attn: float = 0.5  # KV read by decode attention, share of mem_bw_gbs
    eff_flops_decode: float = 0.3
    eff_flops_prefill: float = 0.5
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0  # per request in a step (sampling, bookkeeping)
    exchange_layer_s: float = 0.0  # offloaded decode: one q/k/v -> out round trip per layer
    # Whether that round trip hides behind the decode's local attention (sim/cost.py); False:
    # only the executor's attention does, the round trip adds to every offloaded step.
    exchange_hidden: bool = True
    # Decode, per offloaded request in a step beyond seq_overhead_s: packing its q, k, v
    # and placing its outputs on every layer, and what else its step pays for it (fitted).
    offload_seq_overhead_s: float = 0.0
    link_gbs: float = 25.0  # KV handoff between instances
    handoff_latency_s: float = 1e-4
    # Executor's share of its device's memory bandwidth, by its share of the device
    # (piecewise linear through these (share, bandwidth share) points).
    executor_bw_curve: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1.0, 1.0))
    # Prefill slows by 1 / (1 - share) while its executor holds requests (same device).
    executor_steals_compute: bool = True
    default_executor_share: float = 0.25  # of its device an executor gets unless told
    mem_util: float = 0.9  # of mem_gib usable for weights + KV
    # Shared cores (this CPU): every instance runs one thread on ``cores`` cores, so a step
    # started while n threads are busy takes max(1, n / cores) times as long. 0: one device
    # per instance (GPUs). ``frontend_cores``: what an HTTP serving path (proxy, ingress,
    # client) keeps busy on the same cores while requests are in flight.
    cores: float = 0.0
    frontend_cores: float = 0.0
    # The start-up profile's attention per KV token over the served one's (the policy reads
    # the profile; steps run at the served speed). 1: the profile times what serving does.
    profiled_attention_ratio: float = 1.0
    fitted_on: dict = field(default_factory=dict)

    def executor_bw_gbs(self, share: float) -> float:
        pts = sorted(self.executor_bw_curve)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if share <= x1:
                return self.mem_bw_gbs * (y0 + (y1 - y0) * (share - x0) / (x1 - x0))
        return self.mem_bw_gbs * pts[-1][1]

    def to_json(self) -> dict:
        d = asdict(self)
        d["executor_bw_curve"] = [list(p) for p in self.executor_bw_curve]
        return d

    @classmethod
    def from_json(cls, d: dict) -> HardwareProfile:
        d = dict(d)
        d["executor_bw_curve"] = tuple(tuple(p) for p in d.get("executor_bw_curve", ()))
        return cls(**d)


def load_profiles(path: Path = PROFILES_PATH) -> dict[str, HardwareProfile]:
    """Fitted profiles, plus A100-80GB and H100 derived from the fitted H200."""
    raw = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    profiles = {k: HardwareProfile.from_json(v) for k, v in raw.items()}
    if "h200" in profiles:
        for name in DERIVED_FROM_H200:
            profiles[name] = derive(profiles["h200"], name)
    return profiles


def derive(fitted: HardwareProfile, name: str) -> HardwareProfile:
    """``fitted``'s efficiencies and overheads on device ``name``'s spec-sheet peaks."""
    return replace(fitted, name=name, **SPEC_SHEETS[name],
                   fitted_on={"derived_from": fitted.name, "peaks": "spec sheet"})


def get_profile(name: str) -> HardwareProfile:
    profiles = load_profiles()
    if name not in profiles:
        raise ValueError(f"hardware: unknown profile {name!r} (known: {', '.join(profiles)}; "
                         "run `python -m adrenaline.sim fit` to fit cpu, "
                         "cpu-pinned(-served, -kernel) and h200)")
    return profiles[name]

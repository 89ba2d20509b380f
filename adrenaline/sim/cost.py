"""Step-cost model: how long one prefill or decode step of one instance takes.

Additive roofline terms (each a quantity over a fitted rate) plus overheads:

  prefill = step + L x layer + n x seq + weights / (bw x eff_mem)
            + (linear FLOPs + attention FLOPs) / (peak x eff_flops_prefill)
  decode  = step + L x layer + b x seq + weights / (bw x eff_mem)
            + b x linear FLOPs per token / (peak x eff_flops_decode)
            + local KV / (bw x eff_attn) + wait + offloaded x offload_seq
  wait    = max(0, [offloaded] L x exchange + offloaded KV / executor bandwidth - local)
            (exchange_hidden: the round trip overlaps local attention, per layer)
          = max(0, offloaded KV / executor bandwidth - local) + [offloaded] L x exchange
            (not exchange_hidden: only the executors' attention overlaps; the round
            trip is paid on top)

The local attention of a decode step overlaps the executors' work on the
offloaded requests (engine/remote_attention.py posts both, then waits); ``wait`` is
what the decode then waits on them (the live decode worker's remote wait).
"""

from __future__ import annotations

from adrenaline.sim.hardware import HardwareProfile
from adrenaline.sim.models import ModelSpec


class CostModel:
    def __init__(self, model: ModelSpec, hw: HardwareProfile, executor_share: float = 0.25):
        self.model, self.hw = model, hw
        bw = hw.mem_bw_gbs * 1e9
        peak = hw.flops_tflops * 1e12
        self.kv_bytes = model.kv_bytes_per_token
        self.fixed = hw.step_overhead_s + model.layers * hw.layer_overhead_s
        self.weights_s = model.step_weight_bytes / (bw * hw.eff_mem)
        self.decode_tok_s = model.linear_flops_per_token / (peak * hw.eff_flops_decode)
        self.prefill_flop_s = 1.0 / (peak * hw.eff_flops_prefill)
        self.kv_tok_s = self.kv_bytes / (bw * hw.eff_attn)
        self.executor_share = executor_share
        exec_bw = hw.executor_bw_gbs(executor_share) * 1e9 * hw.eff_attn
        self.exec_kv_tok_s = self.kv_bytes / exec_bw if exec_bw > 0 else float("inf")
        self.exchange_s = model.layers * hw.exchange_layer_s
        self.prefill_slowdown = (1.0 / (1.0 - executor_share)
                                 if hw.executor_steals_compute and executor_share < 1 else 1.0)

    def prefill_s(self, query_lens: list[int], context_lens: list[int],
                  executor_busy: bool = False) -> float:
        m = self.model
        flops = sum(query_lens) * m.linear_flops_per_token + sum(
            m.attention_flops(q, c) for q, c in zip(query_lens, context_lens))
        compute = flops * self.prefill_flop_s
        if executor_busy:
            compute *= self.prefill_slowdown
        return (self.fixed + len(query_lens) * self.hw.seq_overhead_s + self.weights_s + compute)

    def decode_s(self, batch: int, local_kv_tokens: int, offloaded: int = 0,
                 offloaded_kv_tokens: int = 0, all_offloaded: int | None = None) -> float:
        """``offloaded``, ``offloaded_kv_tokens``: the slowest executor's requests and KV;
        ``all_offloaded``: the step's offloaded requests on every executor (default:
        ``offloaded``)."""
        n_off = offloaded if all_offloaded is None else all_offloaded
        return (self.fixed + batch * (self.hw.seq_overhead_s + self.decode_tok_s) + self.weights_s
                + self._attention_s(local_kv_tokens, offloaded, offloaded_kv_tokens)
                + n_off * self.hw.offload_seq_overhead_s)

    def _attention_s(self, local_kv_tokens: int, offloaded: int, offloaded_kv_tokens: int
                     ) -> float:
        """The step's attention as the decode sees it: local, then any wait on executors."""
        local = local_kv_tokens * self.kv_tok_s
        if not offloaded:
            return local
        remote = offloaded_kv_tokens * self.exec_kv_tok_s
        if self.hw.exchange_hidden:
            return max(local, self.exchange_s + remote)
        return max(local, remote) + self.exchange_s

    def remote_wait_s(self, local_kv_tokens: int, offloaded: int, offloaded_kv_tokens: int
                      ) -> float:
        """Seconds a decode step waits on its executors beyond its own local attention."""
        return (self._attention_s(local_kv_tokens, offloaded, offloaded_kv_tokens)
                - local_kv_tokens * self.kv_tok_s)

    def handoff_s(self, tokens: int) -> float:
        return self.hw.handoff_latency_s + tokens * self.kv_bytes / (self.hw.link_gbs * 1e9)

    def capacity_tokens(self, reserve_bytes: float = 0.0) -> int:
        """KV tokens a device holds beside the weights (and ``reserve_bytes`` more)."""
        free = (self.hw.mem_gib * 2**30 * self.hw.mem_util - self.model.weight_bytes
                - reserve_bytes)
        return max(int(free // self.kv_bytes), 0)

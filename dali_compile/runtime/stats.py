"""Counters of the hybrid runtime, per MoE layer and in total.

Counts are exact; times are host wall-clock seconds (on CUDA, GPU time shows up where the host waits
for it). Read them with `dali_compile.offload_stats(model)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(slots=True)
class LayerStats:
    steps: int = 0
    hits: int = 0  # active experts found in the layer's cache
    misses: int = 0  # active experts not in the cache (run on the CPU or copied)
    copies: int = 0  # experts copied to the device (staging, admissions, background, prefetches)
    prefetches: int = 0  # experts of this layer copied early by the previous layer's prediction
    prefetch_hits: int = 0  # prefetched experts this layer's step really routed tokens to
    bytes_copied: int = 0
    experts_cpu: int = 0
    experts_gpu: int = 0
    tokens_cpu: int = 0  # (token, expert) pairs computed on the CPU
    tokens_gpu: int = 0
    plan_s: float = 0.0  # counting workloads and the policy's decision
    cpu_s: float = 0.0  # running the CPU experts (on the step's thread, after the GPU work was issued)
    gpu_s: float = 0.0  # issuing (and, emulated, running) the GPU experts
    copy_wait_s: float = 0.0  # blocked on copies
    total_s: float = 0.0
    # The host thread's own CPU time in the step (counting, the policy, the prefetch's prediction and issue,
    # issuing copies and launches, the combine's launch, Python glue): thread CPU time, so waits and time
    # preempted by other threads are out, and the emulated accelerator's own work and the CPU experts' call
    # (kernels on this thread) are taken out.
    host_s: float = 0.0

    def add(self, other: LayerStats) -> None:
        # Once per layer step, so written out: a loop of getattr/setattr over the fields cost 2-3x as much (a
        # test checks that every field is here).
        self.steps += other.steps
        self.hits += other.hits
        self.misses += other.misses
        self.copies += other.copies
        self.prefetches += other.prefetches
        self.prefetch_hits += other.prefetch_hits
        self.bytes_copied += other.bytes_copied
        self.experts_cpu += other.experts_cpu
        self.experts_gpu += other.experts_gpu
        self.tokens_cpu += other.tokens_cpu
        self.tokens_gpu += other.tokens_gpu
        self.plan_s += other.plan_s
        self.cpu_s += other.cpu_s
        self.gpu_s += other.gpu_s
        self.copy_wait_s += other.copy_wait_s
        self.total_s += other.total_s
        self.host_s += other.host_s

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


def total(layers: list[LayerStats]) -> LayerStats:
    result = LayerStats()
    for layer in layers:
        result.add(layer)
    return result


def format_table(names: list[str], layers: list[LayerStats]) -> str:
    """A plain-text table, one row per layer and a total row."""
    header = (f"{'layer':<28} {'steps':>5} {'hit%':>5} {'copies':>6} {'MB copied':>9} {'cpu exp':>7} {'gpu exp':>7} "
              f"{'cpu tok':>7} {'gpu tok':>7} {'plan ms':>8} {'cpu ms':>8} {'gpu ms':>8} {'wait ms':>8} "
              f"{'host us/step':>12}")
    rows = [header]
    for name, s in [*zip(names, layers, strict=True), ("total", total(layers))]:
        rows.append(
            f"{name[-28:]:<28} {s.steps:>5} {100 * s.hit_rate:>5.1f} {s.copies:>6} {s.bytes_copied / 1e6:>9.2f} "
            f"{s.experts_cpu:>7} {s.experts_gpu:>7} {s.tokens_cpu:>7} {s.tokens_gpu:>7} {1e3 * s.plan_s:>8.2f} "
            f"{1e3 * s.cpu_s:>8.2f} {1e3 * s.gpu_s:>8.2f} {1e3 * s.copy_wait_s:>8.2f} "
            f"{1e6 * s.host_s / max(s.steps, 1):>12.0f}"
        )
    return "\n".join(rows)

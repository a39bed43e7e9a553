"""What a run measured besides time: the expert runtime's counters over a stretch of work, and memory in use.
The one summary line `run` ends with, and the hit rate and CPU share `bench` reports, come from here."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from ..memory_budget import format_bytes
from ..offload import offload_stats, runtime_of
from .streaming import Timing


@dataclass(frozen=True)
class ExpertCounts:
    """The offload runtime's totals at one moment (`offload_stats(model)["total"]`); None: not offloaded, every
    expert on the CPU. Differences of two give what happened between them."""

    hits: int = 0
    misses: int = 0
    tokens_cpu: int = 0
    tokens_gpu: int = 0

    @classmethod
    def read(cls, model) -> ExpertCounts | None:
        if not is_offloaded(model):
            return None
        total = offload_stats(model)["total"]
        return cls(total["hits"], total["misses"], total["tokens_cpu"], total["tokens_gpu"])

    def since(self, before: ExpertCounts) -> ExpertCounts:
        return ExpertCounts(self.hits - before.hits, self.misses - before.misses,
                            self.tokens_cpu - before.tokens_cpu, self.tokens_gpu - before.tokens_gpu)

    @property
    def hit_rate(self) -> float | None:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else None

    @property
    def cpu_share(self) -> float | None:
        """(token, expert) pairs computed on the CPU, as a share of all."""
        tokens = self.tokens_cpu + self.tokens_gpu
        return self.tokens_cpu / tokens if tokens else None


def is_offloaded(model) -> bool:
    try:
        runtime_of(model)
    except ValueError:
        return False
    return True


def host_rss() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def host_peak_rss() -> int:
    """The most resident memory this process had (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_memory_text(model, device: str) -> str:
    """The device's share: CUDA's peak allocation; the emulated device's expert slots in use; nothing on the CPU."""
    if str(device).startswith("cuda"):
        return f"device {format_bytes(torch.cuda.max_memory_allocated(torch.device(device)))} peak"
    if is_offloaded(model):
        return f"device {format_bytes(offload_stats(model)['expert_bytes_used'])} (emulated expert slots)"
    return "device none"


def summary_line(timing: Timing, experts: ExpertCounts | None, model, device: str) -> str:
    """prefill and decode tokens/s | expert hit rate | CPU/GPU split of expert tokens | memory."""

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} tok/s"

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    cpu = 1.0 if experts is None else experts.cpu_share
    split = "n/a" if cpu is None else f"CPU {share(cpu)} / GPU {share(1 - cpu)}"
    rss = host_rss()
    peak = max(host_peak_rss(), rss or 0)  # ru_maxrss is updated lazily: it can lag the current RSS
    host = f"host RSS {format_bytes(rss)}" if rss is not None else "host"
    return (f"prefill {rate(timing.prefill_rate)} ({timing.prompt_tokens} tokens) | "
            f"decode {rate(timing.decode_rate)} ({timing.decode_tokens} tokens) | "
            f"expert hit rate {'n/a' if experts is None else share(experts.hit_rate)} | "
            f"expert tokens {split} | memory: {host} (peak {format_bytes(peak)}), "
            f"{device_memory_text(model, device)}")

"""How much memory a model will need, and how much there is: the checks and the automatic expert budget of
`dali_compile.load`.

Host side, before anything is read: the resident size of the loaded model (quantized sizes where it will
be quantized; on CUDA only the experts stay on the host) plus the largest shard, which is what the
loader holds besides the model at worst, against the memory available to this process (the kernel's
MemAvailable, lowered by a cgroup limit; `DALI_HOST_MEMORY` overrides both, for containers whose limit
neither shows).

Device side, `expert_memory="auto"`: the device's free memory once the non-expert weights are there,
minus the KV cache of `context_length` tokens and the activations of a prompt that long, both measured
on the loaded model by a short probe forward, minus a margin, rounded down to whole expert slots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .runtime.accelerator import parse_bytes

GIB = 2**30
# Left free on the device besides what is measured: allocator fragmentation, CUDA graphs, the
# runtime's small tables. A share of the total and at least this much.
MARGIN_SHARE = 0.05
MIN_MARGIN = 256 * 2**20
# What `device="emulated"` pretends to have free (DALI_EMULATED_MEMORY overrides).
EMULATED_MEMORY = "1GiB"


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def available_host_memory() -> int:
    """Bytes this process may still allocate on the host: MemAvailable, lowered by the cgroup's limit."""
    override = os.environ.get("DALI_HOST_MEMORY")
    if override:
        return parse_bytes(override)
    available = _meminfo_available()
    limit = _cgroup_headroom()
    return available if limit is None else min(available, limit)


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not a dependency: only where /proc is missing

    return int(psutil.virtual_memory().available)


def _cgroup_headroom() -> int | None:
    """cgroup v2 memory.max minus memory.current, or None without a limit."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def anonymous_memory() -> int | None:
    """This process's resident anonymous memory now (bytes; None off Linux): what loading costs the host,
    file-backed pages of the mapped shards aside (the kernel drops those under pressure)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class ExpertBudget:
    """The arithmetic of `expert_memory="auto"`, kept for the load summary."""

    free: int
    kv_cache: int
    activations: int
    margin: int
    slot_bytes: int
    slots: int
    total_experts: int
    context_length: int
    where: str

    @property
    def budget(self) -> int:
        return self.slots * self.slot_bytes

    def describe(self) -> str:
        return (f"expert_memory=auto on {self.where}: {format_bytes(self.free)} free - KV cache "
                f"{format_bytes(self.kv_cache)} ({self.context_length} tokens) - activations "
                f"{format_bytes(self.activations)} - margin {format_bytes(self.margin)} = "
                f"{format_bytes(self.budget)}: {self.slots} slots of {format_bytes(self.slot_bytes)} "
                f"({self.total_experts} experts in the model)")


@dataclass(frozen=True)
class ProbeMeasurement:
    """What one probe forward of `tokens` tokens measured."""

    tokens: int
    kv_bytes_per_token: int
    activation_bytes: int  # device memory beyond the KV cache at the forward's peak (0: not measurable)


def auto_expert_budget(free: int, total: int, probe: ProbeMeasurement, context_length: int, slot_bytes: int,
                       total_experts: int, where: str) -> ExpertBudget:
    """`free` bytes on the device now (non-expert weights in place), `total` its capacity."""
    kv = probe.kv_bytes_per_token * context_length
    # Activations grow with the prompt (the probe's logits stop at the last token, as generate's do).
    activations = -(-probe.activation_bytes * context_length // probe.tokens)
    margin = max(int(MARGIN_SHARE * total), min(MIN_MARGIN, total // 10))
    room = free - kv - activations - margin
    slots = max(0, min(room // slot_bytes, total_experts)) if slot_bytes else 0
    return ExpertBudget(free, kv, activations, margin, slot_bytes, int(slots), total_experts, context_length, where)


@torch.no_grad()
def probe_forward(model: nn.Module, device: torch.device, tokens: int = 16) -> ProbeMeasurement:
    """Runs one prefill of `tokens` tokens (an offloaded model, every expert on the CPU) and measures the KV
    cache it leaves and, on CUDA, the device memory its activations took at the peak."""
    from transformers import DynamicCache

    from .hf_compat import cache_keyword

    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    model(input_ids=ids, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
    kv = _cache_bytes(cache)
    activations = 0
    if on_cuda:
        torch.cuda.synchronize(device)
        activations = max(0, torch.cuda.max_memory_allocated(device) - before - kv)
    return ProbeMeasurement(tokens, -(-kv // tokens), activations)


def _cache_bytes(cache) -> int:
    seen, total = set(), 0
    for layer in getattr(cache, "layers", []):
        for tensor in vars(layer).values():
            if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def device_free_memory(device: torch.device) -> tuple[int, int, str]:
    """(free, total, a name for messages) of the device the non-expert weights went to."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total), f"{device} ({torch.cuda.get_device_name(device)})"
    total = parse_bytes(os.environ.get("DALI_EMULATED_MEMORY", EMULATED_MEMORY))
    return total, total, f"the emulated accelerator (DALI_EMULATED_MEMORY={format_bytes(total)})"


def return_freed_memory() -> None:
    """Hands the heap's free pages back to the system (glibc's malloc_trim). glibc raises its mmap threshold
    after a large block is freed, so later full-precision tensors of a load come from the heap, and freeing
    them would otherwise leave that memory counted against the process. No-op off glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None

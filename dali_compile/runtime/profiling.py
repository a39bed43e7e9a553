"""Warm-up profiling of the cost model: t_cpu(w), t_gpu(w) and one expert's copy, on this machine.

Measured once per (accelerator, CPU runtime, expert shape, dtype, layout) and stored as JSON under
the dali_compile cache directory (`cost_models.json`), so a second start reads it back; `refresh=True`
measures again. Several processes may share the store: each write is a read-modify-write under an flock
on `cost_models.json.lock`, through a unique temporary file and an atomic rename, so readers see a whole
file and concurrent writers keep each other's entries. A damaged store (not JSON, or not shaped as
below) gives a warning and is treated as empty; damaged entries are dropped and measured again.

    {"<key>": {"workloads": [int, ...], "cpu_seconds": [float, ...], "gpu_seconds": [float, ...],
               "transfer_seconds": float}, ...}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from dali_compile.ops.cpu_experts import cpu_experts
from dali_compile.ops.gpu_experts import gpu_experts

from . import build_cache, cpu_extension
from .accelerator import Accelerator
from .expert_cache import SlotPool
from .layer_spec import LayerSpec
from .planner import CostModel

PROFILED_WORKLOADS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 3  # timed calls per figure on the accelerator (after a warm-up)
CPU_REPEATS = 9  # timed CPU calls per figure: they are short, and a 2-core host is noisy
CALL_EXPERTS = 8  # experts in the call that separates a CPU call's fixed part from its per-expert part


def _key(accelerator: Accelerator, spec: LayerSpec) -> str:
    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.name
    shapes = "-".join("x".join(map(str, t.shape[1:])) for t in spec.tensors() if t is not None)
    threads = cpu_extension.get_num_threads() if cpu_extension.cpu_extension_available() else 1
    # v4: t_cpu from calls over one and over k experts not in the caches (measure_costs); v3 entries not reused
    return (f"v4|{device}|{cpu_extension.cpu_isa()}x{threads}|torch{torch.__version__}|{spec.dtype}|{shapes}|"
            f"{spec.layout.describe()}")


def _store() -> Path:
    return build_cache.cache_dir() / "cost_models.json"


def _valid_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    lists = [entry.get(name) for name in ("workloads", "cpu_seconds", "gpu_seconds")]
    if not all(isinstance(values, list) and values for values in lists) or len({len(v) for v in lists}) != 1:
        return False
    call = entry.get("cpu_call_seconds", 0.0)  # absent in entries stored before it was measured: 0
    numbers = [*lists[1], *lists[2], entry.get("transfer_seconds"), call]
    return (all(isinstance(w, int) and not isinstance(w, bool) for w in lists[0])
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers)
            and 0 <= call <= min(lists[1]))


def _read_store(path: Path) -> dict:
    """The stored entries that are well formed; a damaged file or entry warns and counts as absent."""
    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"dali_compile: ignoring the damaged cost-model store {path} ({error}); it is measured "
                      f"again and rewritten", RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(stored, dict):
        warnings.warn(f"dali_compile: ignoring the cost-model store {path}: a JSON object was expected, found "
                      f"{type(stored).__name__}; it is measured again and rewritten", RuntimeWarning, stacklevel=3)
        return {}
    damaged = [key for key, entry in stored.items() if not _valid_entry(entry)]
    if damaged:
        warnings.warn(f"dali_compile: dropping {len(damaged)} damaged entries of {path} (measured again when "
                      f"needed): {damaged[:3]}", RuntimeWarning, stacklevel=3)
    return {key: entry for key, entry in stored.items() if key not in damaged}


@contextlib.contextmanager
def _store_lock(path: Path):
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a small write; dropped if this process dies
        yield
    finally:
        os.close(fd)


def _store_entry(path: Path, key: str, entry: dict) -> None:
    """Adds `entry` under `key` to the store, keeping what other processes wrote meanwhile."""
    build_cache.make_private_dirs(path.parent)
    with _store_lock(path):
        stored = _read_store(path)
        stored[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(stored, file, indent=1)
            os.replace(tmp, path)  # atomic: a reader sees the old or the new file, never half of one
        except BaseException:
            os.unlink(tmp)
            raise


def _median_seconds(fn, synchronize) -> float:
    fn()  # warm-up
    synchronize()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _ColdExperts:
    """Hands out the layer's experts in turn, so that each timed CPU call reads weights that the calls just
    before it did not bring into the caches: in a decode step an expert's weights come from memory (or the
    last-level cache), not from the core's own cache as in a loop over one expert, which made the profile
    0.6-0.75x of the runtime's calls on this machine."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.next = 0

    def take(self, count: int) -> list[int]:
        taken = [(self.next + i) % self.num_experts for i in range(count)]
        self.next = (self.next + count) % self.num_experts
        return taken


def _cpu_seconds(spec: LayerSpec, cases: list[tuple[int, int]]) -> list[float]:
    """Per case (tokens, experts per call): the median time of CPU-experts calls over that many experts of
    that many tokens each. Every call reads experts the calls before it did not touch (`_ColdExperts`), and
    the cases are timed in interleaved rounds (after a warm-up round), so that a burst of load from another
    process slows one round of every case instead of every call of one case (on the 2-core host, one
    case-by-case profile once came out 2x slower than the next)."""
    experts = _ColdExperts(spec.num_experts)
    inputs = []
    for tokens, per_call in cases:
        hidden = torch.randn(tokens * per_call, spec.hidden_size, dtype=spec.dtype)
        weights = torch.ones(tokens * per_call, 1, dtype=torch.float32)
        inputs.append((tokens, per_call, hidden, weights))
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(CPU_REPEATS + 1):
        for case, (tokens, per_call, hidden, weights) in enumerate(inputs):
            chosen = experts.take(per_call)
            mask = torch.zeros(spec.num_experts, dtype=torch.bool)
            mask[chosen] = True
            ids = torch.tensor(chosen, dtype=torch.int64).repeat_interleave(tokens)[:, None]
            # The CPU call returns when done: no accelerator sync in its timing (on the emulated device that
            # sync alone added ~40 us to every CPU figure).
            start = time.perf_counter()
            cpu_experts(spec, hidden, ids, weights, mask)
            if round_:  # round 0 warms up
                times[case].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _non_decreasing(seconds: list[float]) -> list[float]:
    """A call over more tokens never takes less time: each figure is capped by every later one (noise that
    says otherwise, a slow first figure most often, is cut down to them)."""
    capped = list(seconds)
    for i in range(len(capped) - 2, -1, -1):
        capped[i] = min(capped[i], capped[i + 1])
    return capped


def measure_costs(accelerator: Accelerator, spec: LayerSpec, pool: SlotPool, slot: int) -> CostModel:
    """Time the experts on the CPU runtime (host weights, experts the previous calls did not touch) and
    expert 0 in `slot` of `pool`.

    A decode step makes one CPU call over all its CPU experts, so the CPU side is measured as such calls: per
    workload w, a call over one expert (t_1) and one over k experts (t_k), each of w tokens. The per-expert
    part m(w) = (t_k - t_1) / (k - 1) and the call's fixed part f = t_1(1) - m(1) make t_cpu(w) = f + m(w),
    so that n experts in one call cost f + sum m(w_i) = sum t_cpu(w_i) - (n - 1) f, as the simulator counts
    them. (Single-expert calls summed instead overestimated steps of many one-token experts 1.4-1.6x.)"""
    H, E = spec.hidden_size, spec.num_experts
    sync = accelerator.synchronize
    transfer = _median_seconds(lambda: pool.load(slot, spec, 0, None), sync)
    table = torch.full((E,), -1, dtype=torch.int32)
    table[0] = slot
    table = accelerator.to_device(table)
    k = min(E, CALL_EXPERTS)
    per_call = (1, k) if k >= 2 else (1,)
    cpu = _cpu_seconds(spec, [(w, n) for w in PROFILED_WORKLOADS for n in per_call])
    singles, many = cpu[::len(per_call)], cpu[1::len(per_call)]
    gpu_times = []
    for w in PROFILED_WORKLOADS:
        hidden = torch.randn(w, H, dtype=spec.dtype)
        ids = torch.zeros(w, 1, dtype=torch.int64)
        weights = torch.ones(w, 1, dtype=torch.float32)
        dh, di, dg = (accelerator.to_device(t) for t in (hidden, ids, weights))
        gpu_times.append(_median_seconds(
            lambda h=dh, i=di, g=dg: gpu_experts(h, i, g, pool.up, pool.down, pool.up_bias, pool.down_bias, table,
                                                 spec.layout, pool.up_scales, pool.down_scales), sync))
    # The accelerator's figures too: a slow first one (2.1 ms against 0.45 ms for the rest, measured while another
    # process shared the 2 cores) was stored for good and turned the dali policy's prefetch off on that machine.
    gpu_times = _non_decreasing(gpu_times)
    if k < 2:  # one expert per layer: every call is a single expert's
        return CostModel(PROFILED_WORKLOADS, tuple(_non_decreasing(singles)), tuple(gpu_times), transfer, 0.0)
    marginal = _non_decreasing([max(0.0, (t_k - t_1) / (k - 1)) for t_1, t_k in zip(singles, many, strict=True)])
    fixed = max(0.0, singles[0] - marginal[0])
    return CostModel(PROFILED_WORKLOADS, tuple(fixed + m for m in marginal), tuple(gpu_times), transfer, fixed)


def profiled_costs(accelerator: Accelerator, spec: LayerSpec, pool: SlotPool, slot: int,
                   refresh: bool = False) -> CostModel:
    """The stored cost model for this machine and expert shape, measured now if absent or `refresh`."""
    key, path = _key(accelerator, spec), _store()
    if not refresh:
        entry = _read_store(path).get(key)
        if entry is not None:
            return CostModel(tuple(entry["workloads"]), tuple(entry["cpu_seconds"]), tuple(entry["gpu_seconds"]),
                             float(entry["transfer_seconds"]), float(entry.get("cpu_call_seconds", 0.0)))
    cost = measure_costs(accelerator, spec, pool, slot)  # not under the lock: it takes seconds
    _store_entry(path, key, {"workloads": list(cost.workloads), "cpu_seconds": list(cost.cpu_seconds),
                             "gpu_seconds": list(cost.gpu_seconds), "transfer_seconds": cost.transfer_seconds,
                             "cpu_call_seconds": cost.cpu_call_seconds})
    return cost

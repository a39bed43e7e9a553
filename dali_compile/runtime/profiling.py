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
REPEATS = 3
CALL_EXPERTS = 8  # experts in the call that separates a CPU call's fixed part from its per-expert part


def _key(accelerator: Accelerator, spec: LayerSpec) -> str:
    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.name
    shapes = "-".join("x".join(map(str, t.shape[1:])) for t in spec.tensors() if t is not None)
    threads = cpu_extension.get_num_threads() if cpu_extension.cpu_extension_available() else 1
    # v3: CPU times without an accelerator sync, and the CPU call's fixed part (older entries are not reused)
    return (f"v3|{device}|{cpu_extension.cpu_isa()}x{threads}|torch{torch.__version__}|{spec.dtype}|{shapes}|"
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


def measure_costs(accelerator: Accelerator, spec: LayerSpec, pool: SlotPool, slot: int) -> CostModel:
    """Time one expert (expert 0 of `spec`, host weights) on the CPU runtime and in `slot` of `pool`."""
    H, E = spec.hidden_size, spec.num_experts
    sync = accelerator.synchronize
    transfer = _median_seconds(lambda: pool.load(slot, spec, 0, None), sync)
    table = torch.full((E,), -1, dtype=torch.int32)
    table[0] = slot
    table = accelerator.to_device(table)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[0] = True
    cpu_times, gpu_times = [], []
    for w in PROFILED_WORKLOADS:
        hidden = torch.randn(w, H, dtype=spec.dtype)
        ids = torch.zeros(w, 1, dtype=torch.int64)
        weights = torch.ones(w, 1, dtype=torch.float32)
        # The CPU call returns when done: no accelerator sync in its timing (on the emulated device that sync
        # alone added ~40 us to every CPU figure).
        cpu_times.append(_median_seconds(lambda h=hidden, i=ids, g=weights: cpu_experts(spec, h, i, g, mask),
                                         lambda: None))
        dh, di, dg = (accelerator.to_device(t) for t in (hidden, ids, weights))
        gpu_times.append(_median_seconds(
            lambda h=dh, i=di, g=dg: gpu_experts(h, i, g, pool.up, pool.down, pool.up_bias, pool.down_bias, table,
                                                 spec.layout), sync))
    return CostModel(PROFILED_WORKLOADS, tuple(cpu_times), tuple(gpu_times), transfer,
                     _cpu_call_seconds(spec, min(E, CALL_EXPERTS), cpu_times[0], min(cpu_times)))


def _cpu_call_seconds(spec: LayerSpec, k: int, one_expert: float, bound: float) -> float:
    """The fixed part f of a CPU-experts call, from one call over k experts of one token each:
    t_k = f + k m and t_1 = f + m give f = t_1 - (t_k - t_1) / (k - 1), kept within [0, bound] (every t_cpu)."""
    if k < 2:
        return 0.0
    hidden = torch.randn(k, spec.hidden_size, dtype=spec.dtype)
    ids = torch.arange(k, dtype=torch.int64)[:, None]
    weights = torch.ones(k, 1, dtype=torch.float32)
    mask = torch.zeros(spec.num_experts, dtype=torch.bool)
    mask[:k] = True
    many = _median_seconds(lambda: cpu_experts(spec, hidden, ids, weights, mask), lambda: None)
    return min(bound, max(0.0, one_expert - (many - one_expert) / (k - 1)))


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

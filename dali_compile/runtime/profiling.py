"""Warm-up profiling of the cost model: t_cpu(w), t_gpu(w) and one expert's copy, on this machine.

Measured once per (accelerator, CPU runtime, expert shape, dtype, layout) and stored as JSON under
the dali_compile cache directory, so a second start reads it back; `refresh=True` measures again.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from dali_compile.ops.cpu_experts import cpu_experts
from dali_compile.ops.gpu_experts import gpu_experts

from . import cpu_extension
from .accelerator import Accelerator
from .expert_cache import SlotPool
from .layer_spec import LayerSpec
from .planner import CostModel

PROFILED_WORKLOADS = (1, 2, 4, 8, 16, 32, 64)
REPEATS = 3


def _key(accelerator: Accelerator, spec: LayerSpec) -> str:
    device = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else accelerator.name
    shapes = "-".join("x".join(map(str, t.shape[1:])) for t in spec.tensors() if t is not None)
    threads = cpu_extension.get_num_threads() if cpu_extension.cpu_extension_available() else 1
    return (f"{device}|{cpu_extension.cpu_isa()}x{threads}|torch{torch.__version__}|{spec.dtype}|{shapes}|"
            f"{spec.layout.describe()}")


def _store() -> Path:
    return cpu_extension.cache_dir().parent / "cost_models.json"


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
        cpu_times.append(_median_seconds(lambda h=hidden, i=ids, g=weights: cpu_experts(spec, h, i, g, mask), sync))
        dh, di, dg = (accelerator.to_device(t) for t in (hidden, ids, weights))
        gpu_times.append(_median_seconds(
            lambda h=dh, i=di, g=dg: gpu_experts(h, i, g, pool.up, pool.down, pool.up_bias, pool.down_bias, table,
                                                 spec.layout), sync))
    return CostModel(PROFILED_WORKLOADS, tuple(cpu_times), tuple(gpu_times), transfer)


def profiled_costs(accelerator: Accelerator, spec: LayerSpec, pool: SlotPool, slot: int,
                   refresh: bool = False) -> CostModel:
    """The stored cost model for this machine and expert shape, measured now if absent or `refresh`."""
    key, path = _key(accelerator, spec), _store()
    stored = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}  # a damaged store is measured again, never trusted
    if not refresh and key in stored:
        entry = stored[key]
        return CostModel(tuple(entry["workloads"]), tuple(entry["cpu_seconds"]), tuple(entry["gpu_seconds"]),
                         float(entry["transfer_seconds"]))
    cost = measure_costs(accelerator, spec, pool, slot)
    stored[key] = {"workloads": list(cost.workloads), "cpu_seconds": list(cost.cpu_seconds),
                   "gpu_seconds": list(cost.gpu_seconds), "transfer_seconds": cost.transfer_seconds}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stored, indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one
    return cost

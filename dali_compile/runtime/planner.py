"""Per-step CPU/GPU assignment of one MoE layer's active experts (DALI, arXiv 2602.03495 §4).

# E experts, n active experts this step, w workload = tokens routed to an expert

The problem, per layer and step: choose for each active expert i a device, to
minimise the makespan max(T_cpu, T_gpu) with

    T_cpu = sum over CPU experts of t_cpu(w_i)
    T_gpu = sum over GPU experts of max(trans_i, t_gpu(w_i))     trans_i = 0 if i is cached

(copies of one expert overlap the compute of another, so a GPU expert costs the
longer of the two), subject to the GPU memory constraint the paper leaves out:
at most `max_uncached_on_gpu` experts not already cached may be placed on the
GPU in one step (they need staging slots).

`greedy_plan` is the paper's algorithm; `exact_plan` solves the same 0-1 problem
exactly (for tests and for measuring plan quality). Both are pure functions of
numpy arrays: no tensors, no devices.

`greedy_plan` runs once per MoE layer per decode step, on a handful of experts, so
numpy's per-call overhead would dominate it: the cost model tabulates its costs
for integer workloads once, and the greedy loop runs over Python floats.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

# Integer workloads 1..this are tabulated (decode and most prefill chunks); larger ones are interpolated per call.
TABULATED_WORKLOADS = 4096


@dataclass(frozen=True)
class CostModel:
    """Seconds per expert as a function of its workload, from warm-up profiling.

    t_cpu and t_gpu interpolate linearly between profiled workloads (increasing,
    >= 1) and extrapolate linearly past the last one; `transfer_seconds` is the time
    to copy one expert's weights to the GPU.
    """

    workloads: tuple[int, ...]
    cpu_seconds: tuple[float, ...]
    gpu_seconds: tuple[float, ...]
    transfer_seconds: float
    # The part of one CPU-experts call that does not grow with its experts (dispatch, starting the threads):
    # each t_cpu includes it once, so n experts in one call take cpu_call_seconds + sum(t_cpu - it). The
    # simulator times steps with it; the planner still sums whole t_cpu per expert (a known overestimate of
    # the CPU side for steps of many small experts: see benchmarks/validate_simulator.py).
    cpu_call_seconds: float = 0.0

    def __post_init__(self):
        w = np.asarray(self.workloads, dtype=np.float64)
        if w.ndim != 1 or len(w) < 2 or w[0] < 1 or np.any(np.diff(w) <= 0):
            raise ValueError(f"profiled workloads must be >= 2 increasing values >= 1, got {self.workloads}")
        for name in ("cpu_seconds", "gpu_seconds"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if values.shape != w.shape or np.any(values < 0) or not np.all(np.isfinite(values)):
                raise ValueError(f"{name} must be {len(w)} finite non-negative times, got {getattr(self, name)}")
        if not (self.transfer_seconds >= 0 and np.isfinite(self.transfer_seconds)):
            raise ValueError(f"transfer_seconds must be finite and >= 0, got {self.transfer_seconds}")
        if not (0 <= self.cpu_call_seconds <= min(self.cpu_seconds) and np.isfinite(self.cpu_call_seconds)):
            raise ValueError(f"cpu_call_seconds must be finite, >= 0 and within every t_cpu, got "
                             f"{self.cpu_call_seconds}")
        # Not a dataclass field: equality, hashing, repr and asdict see only the profile.
        object.__setattr__(self, "_table", _CostTable(self))

    def _interpolate(self, table, workloads) -> np.ndarray:
        x = np.asarray(self.workloads, dtype=np.float64)
        y = np.asarray(table, dtype=np.float64)
        w = np.asarray(workloads, dtype=np.float64)
        inside = np.interp(w, x, y)
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return np.where(w > x[-1], y[-1] + slope * (w - x[-1]), inside)

    def t_cpu(self, workloads) -> np.ndarray:
        return self._interpolate(self.cpu_seconds, workloads)

    def t_gpu(self, workloads) -> np.ndarray:
        return self._interpolate(self.gpu_seconds, workloads)


class _CostTable:
    """A cost model's per-expert costs for integer workloads 0..top, indexed by workload (row 0 unused).

    Every entry is computed by the same numpy expressions as `_costs`, so a lookup equals the
    interpolation bit for bit. Rows of `gpu` and `key` are [uncached, cached], flattened: the entry of
    workload w and cached flag c sits at w + c * (top + 1).
    """

    __slots__ = ("top", "cpu", "gpu", "key", "cpu_address", "gpu_address", "key_address", "copy_never_pays")

    def __init__(self, cost: CostModel):
        self.top = TABULATED_WORKLOADS
        workloads = np.arange(self.top + 1)
        workloads[0] = 1  # never looked up (a workload is >= 1); keeps the row finite
        cpu = cost.t_cpu(workloads)
        t_gpu = cost.t_gpu(workloads)
        gpu = np.concatenate([np.maximum(cost.transfer_seconds, t_gpu), np.maximum(0.0, t_gpu)])
        self.cpu = cpu  # float64 [top + 1]
        self.gpu = gpu  # float64 [2 * (top + 1)]: seconds on the GPU, the copy included when uncached
        self.key = np.abs(gpu - np.tile(cpu, 2))  # float64 [2 * (top + 1)]: greedy's visiting order, descending
        # Raw addresses for the C greedy; the arrays live as long as the table (and are never resized).
        self.cpu_address, self.gpu_address, self.key_address = (a.ctypes.data for a in (self.cpu, self.gpu, self.key))
        self.copy_never_pays: dict[tuple[int, int, int], bool] = {}  # copy_never_pays_off's answers


def copy_never_pays_off(cost: CostModel, tokens: int, top_k: int, num_experts: int) -> bool:
    """True when `greedy_plan` can put no uncached expert on the GPU in any step of `tokens` tokens routed to
    `top_k` experts each: the cheapest uncached GPU expert (its copy included) costs more than the largest CPU
    side such a step can have (min(tokens * top_k, E) experts of at most `tokens` tokens each, all on the
    CPU). The greedy sends expert i to the GPU only if T_gpu + g_i <= T_cpu + c_i, and T_gpu >= 0. Then every
    prefetch choice is empty, whatever the routing: a decode step's prediction need not run (a Mixtral expert
    on arXiv 2512.16473's PC: a 28 ms copy against 2 x 7.3 ms on the CPU). Answers are kept per cost model."""
    table: _CostTable = cost._table
    key = (tokens, top_k, num_experts)
    known = table.copy_never_pays.get(key)
    if known is None:
        if not 1 <= tokens <= table.top:
            return False  # past the table (prefill sizes): not worth a bound
        largest_cpu_side = min(tokens * top_k, num_experts) * float(table.cpu[1:tokens + 1].max())
        cheapest_copy = float(table.gpu[1:tokens + 1].min())  # the uncached row: max(transfer, t_gpu(w))
        # (1 + 1e-9): the greedy's running sums round; n * eps of them is far below that margin
        known = table.copy_never_pays[key] = cheapest_copy > largest_cpu_side * (1 + 1e-9)
    return known


@dataclass(frozen=True, eq=False)
class Plan:
    experts: np.ndarray  # int [n]: the active experts, in the order given
    on_gpu: np.ndarray  # bool [n]
    # () -> (seconds on the CPU [n], on the GPU with the copy [n]): the predicted totals are computed on
    # first use only, since the runtime's per-step path never reads them.
    costs: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @cached_property
    def cpu_seconds(self) -> float:
        """T_cpu predicted by the cost model (a numpy sum in index order)."""
        return float(np.add.reduce(self.costs()[0][~self.on_gpu]))

    @cached_property
    def gpu_seconds(self) -> float:
        """T_gpu predicted by the cost model."""
        return float(np.add.reduce(self.costs()[1][self.on_gpu]))

    @property
    def makespan(self) -> float:
        return max(self.cpu_seconds, self.gpu_seconds)

    @property
    def gpu_experts(self) -> np.ndarray:
        return self.experts[self.on_gpu]

    @property
    def cpu_experts(self) -> np.ndarray:
        return self.experts[~self.on_gpu]


@dataclass(frozen=True)
class _Costs:
    """Per active expert: seconds on the CPU, on the GPU (copy included), and whether it needs a copy."""

    cpu: np.ndarray
    gpu: np.ndarray
    needs_copy: np.ndarray


def _check_shapes(workloads: np.ndarray, cached: np.ndarray) -> None:
    if workloads.shape != cached.shape or workloads.ndim != 1:
        raise ValueError(f"workloads {workloads.shape} and cached {cached.shape} must be equal 1-D shapes")


def _costs(workloads, cached, cost: CostModel) -> _Costs:
    workloads = np.asarray(workloads)
    cached = np.asarray(cached, dtype=bool)
    _check_shapes(workloads, cached)
    if np.any(workloads < 1):
        raise ValueError("an active expert has at least one token")
    transfer = np.where(cached, 0.0, cost.transfer_seconds)
    return _Costs(cost.t_cpu(workloads), np.maximum(transfer, cost.t_gpu(workloads)), ~cached)


def _plan(experts, on_gpu, costs: _Costs) -> Plan:
    on_gpu = np.asarray(on_gpu, dtype=bool)
    return Plan(np.asarray(experts), on_gpu, lambda: (costs.cpu, costs.gpu))


def plan_times(workloads, cached, on_gpu, cost: CostModel) -> tuple[float, float]:
    """(T_cpu, T_gpu) of a given assignment under the cost model."""
    plan = _plan(np.arange(len(on_gpu)), on_gpu, _costs(workloads, cached, cost))
    return plan.cpu_seconds, plan.gpu_seconds


def greedy_plan(experts, workloads, cached, cost: CostModel, max_uncached_on_gpu: int) -> Plan:
    """DALI's greedy assignment, with the GPU memory constraint added.

    experts: int [n]; workloads: int [n] (>= 1); cached: bool [n]. Experts are visited by
    |t_gpu - t_cpu| descending (the most device-sensitive first, ties in the order given); each goes to
    the GPU if that keeps T_gpu + g_i <= T_cpu + c_i, else to the CPU. An uncached expert goes to the
    GPU only while staging slots remain.
    """
    if max_uncached_on_gpu < 0:
        raise ValueError(f"max_uncached_on_gpu must be >= 0, got {max_uncached_on_gpu}")
    workloads = np.asarray(workloads)
    cached = np.asarray(cached, dtype=bool)
    native = _native_greedy(experts, workloads, cached, cost, max_uncached_on_gpu)
    if native is not None:
        return native
    cpu, gpu, key = _tabulated_costs(workloads, cached, cost)
    cpu_list, gpu_list, is_cached = cpu.tolist(), gpu.tolist(), cached.tolist()
    on_gpu = bytearray(len(key))  # becomes the bool array without a copy
    cpu_total = gpu_total = 0.0
    copies_left = max_uncached_on_gpu
    # sorted() is stable with reverse=True too: equal keys keep the order given, as a stable argsort of -key.
    for i in sorted(range(len(key)), key=key.__getitem__, reverse=True):
        if (is_cached[i] or copies_left > 0) and gpu_total + gpu_list[i] <= cpu_total + cpu_list[i]:
            on_gpu[i] = 1
            gpu_total += gpu_list[i]
            if not is_cached[i]:
                copies_left -= 1
        else:
            cpu_total += cpu_list[i]
    # The plan's totals are numpy sums in index order (not the running totals above, summed in visiting
    # order), so they equal plan_times' to the bit.
    mask = np.frombuffer(on_gpu, dtype=bool)
    return Plan(np.asarray(experts), mask, lambda: (cpu, gpu))


_native_function = None  # the C greedy (csrc/core/planner.cpp) once looked up; False without the extension


class _NativeBuffers(threading.local):
    """The C greedy's inputs and output, reused from call to call (one set per thread), with their addresses
    taken once: numpy's `.ctypes` costs microseconds per access, three per call, on the decode step's path."""

    capacity = 0

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self.capacity = max(n, 256)
            self.workloads = np.empty(self.capacity, dtype=np.int64)
            self.cached = np.empty(self.capacity, dtype=bool)
            self.on_gpu = np.empty(self.capacity, dtype=bool)
            self.addresses = tuple(a.ctypes.data for a in (self.workloads, self.cached, self.on_gpu))


_native_buffers = _NativeBuffers()


def _native_greedy(experts, workloads: np.ndarray, cached: np.ndarray, cost: CostModel, max_uncached: int):
    """greedy_plan through the C implementation (same choices, about 10x less overhead per call), or None
    where it does not apply: no extension, non-integer workloads, or workloads past the cost table."""
    global _native_function
    if _native_function is None:
        from . import cpu_extension

        _native_function = cpu_extension.greedy_plan_function() or False
    n = len(workloads)
    if not _native_function or workloads.dtype.kind not in "iu" or workloads.ndim != 1 or cached.shape != (n,):
        return None
    table: _CostTable = cost._table
    buffers = _native_buffers
    buffers.reserve(n)
    buffers.workloads[:n] = workloads
    buffers.cached[:n] = cached
    workloads_address, cached_address, on_gpu_address = buffers.addresses
    status = _native_function(n, workloads_address, cached_address, table.cpu_address, table.gpu_address,
                              table.key_address, table.top, max_uncached, on_gpu_address)
    if status != 0:
        return None
    return planned(experts, workloads, cached, buffers.on_gpu[:n].copy(), cost)


def planned(experts, workloads: np.ndarray, cached: np.ndarray, on_gpu: np.ndarray, cost: CostModel) -> Plan:
    """The Plan of an assignment `on_gpu` the greedy made (its costs computed only when read)."""
    def costs():
        cpu, gpu, _ = _tabulated_costs(workloads, cached, cost)
        return cpu, gpu

    return Plan(np.asarray(experts), on_gpu, costs)


def _tabulated_costs(workloads: np.ndarray, cached: np.ndarray, cost: CostModel):
    """(cpu float64 [n], gpu float64 [n], |gpu - cpu| as a list): `_costs`' values, from the cost model's
    table when every workload is an integer it holds, else interpolated."""
    _check_shapes(workloads, cached)
    table: _CostTable = cost._table
    # uint64 is left out: uint64 + int64 indices would be float64.
    integer = workloads.dtype.kind == "i" or (workloads.dtype.kind == "u" and workloads.dtype.itemsize < 8)
    if integer and len(workloads) and min(workloads.tolist()) >= 1:
        try:
            cpu = table.cpu.take(workloads)  # raises IndexError past the table
        except IndexError:
            pass
        else:
            index = workloads + cached * (table.top + 1)
            return cpu, table.gpu.take(index), table.key.take(index).tolist()
    costs = _costs(workloads, cached, cost)  # fractional or very large workloads, errors, n = 0
    return costs.cpu, costs.gpu, np.abs(costs.gpu - costs.cpu).tolist()


def exact_plan(experts, workloads, cached, cost: CostModel, max_uncached_on_gpu: int) -> Plan:
    """The optimal assignment of the same problem, as a small mixed-integer program (scipy's HiGHS).

    min z  s.t.  z >= sum (1 - x_i) c_i,  z >= sum x_i g_i,  sum x_i [i uncached] <= slots,  x binary.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    costs = _costs(workloads, cached, cost)
    n = len(costs.cpu)
    if n == 0:
        return _plan(experts, np.zeros(0, dtype=bool), costs)
    objective = np.zeros(n + 1)
    objective[-1] = 1.0  # variables: x_0..x_{n-1}, z
    cpu_row = np.append(costs.cpu, 1.0)  # z + sum x_i c_i >= sum c_i
    gpu_row = np.append(-costs.gpu, 1.0)  # z - sum x_i g_i >= 0
    memory_row = np.append(costs.needs_copy.astype(float), 0.0)
    constraints = [
        LinearConstraint(cpu_row, lb=costs.cpu.sum()),
        LinearConstraint(gpu_row, lb=0.0),
        LinearConstraint(memory_row, ub=max_uncached_on_gpu),
    ]
    integrality = np.append(np.ones(n), 0)
    bounds = Bounds(np.zeros(n + 1), np.append(np.ones(n), np.inf))
    # mip_rel_gap=0: HiGHS otherwise stops within 1e-4 of the optimum, and "exact" must be exact.
    result = milp(objective, constraints=constraints, integrality=integrality, bounds=bounds,
                  options={"mip_rel_gap": 0.0})
    if not result.success:
        raise RuntimeError(f"exact planner failed: {result.message}")
    return _plan(experts, np.round(result.x[:n]).astype(bool), costs)

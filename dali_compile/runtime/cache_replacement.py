"""Cache replacement: which experts a layer's GPU cache swaps in after a step, for later steps.

# E experts per layer, n active experts in one layer's step, c resident experts, w workload (tokens)

A `CacheReplacement` sees each layer's steps in order (the active experts, their workloads, and the
experts resident at the step's start) and answers (expert, victim) swaps that the runtime copies in the
background after the step: exactly the rules of `Decision.background` (see `policies.check_decision`):
the expert is not resident and named once; the victim is resident and named once, or FREE_SLOT while the
cache has free slots. A victim may have run on the GPU in this very step (the copy waits for that work).
A hit is an active expert resident at the step's start; the swaps pay off from the next step on.

- `WorkloadAware(w_size, u_size)`: DALI's policy (arXiv 2602.03495): per layer, each expert's tokens summed
  over a window of w_size steps; at the window's end the u_size highest-scoring uncached experts replace the
  u_size lowest-scoring cached ones; scores reset.
- `Lru(quota)`, `Lfu(quota)`: the textbook policies, copying every miss after its step (`quota=None`) or at
  most `quota` copies per step on average (to compare at an equal copy budget).
- `Belady(future)`: Belady's MIN, offline (it reads the future): the ceiling of hit rate for replacement on
  demand, with unlimited copies. For replay only.
- `Static()`: never swaps.

One instance keeps one state per layer; the runtime makes one policy (so one replacement) per model.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

import numpy as np

FREE_SLOT = -1  # the victim of a swap into a free cache slot (as policies.FREE_SLOT)

Swaps = tuple[tuple[int, int], ...]

# DALI's (w_size, u_size): (4, 1) for 8-expert models (Mixtral), (4, 8) for 64- and 128-expert ones
# (DeepSeek-V2-Lite, Qwen3-30B-A3B). In between, u_size grows with E: E // 8 clamped to [1, 8].
DEFAULT_WINDOW = 4
MAX_DEFAULT_UPDATE = 8


def default_window(num_experts: int) -> tuple[int, int]:
    """DALI's (w_size, u_size) for layers of `num_experts` experts: w = 4; u = E // 8 within [1, 8], so
    (4, 1) for E = 8, (4, 2) for E = 16, (4, 4) for E = 32, (4, 8) for E >= 64."""
    return DEFAULT_WINDOW, min(MAX_DEFAULT_UPDATE, max(1, num_experts // 8))


def _check_int(owner: str, option: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: option {option} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_quota(owner: str, quota) -> float | None:
    if quota is None:
        return None
    if (
        isinstance(quota, bool)
        or not isinstance(quota, (int, float, np.integer, np.floating))
        or not (math.isfinite(quota) and quota >= 0)
    ):
        raise ValueError(f"{owner}: option quota must be None or a finite number >= 0, got {quota!r}")
    return float(quota)


def _pair(entering: list[int], free: int, victims: list[int]) -> Swaps:
    """(expert, victim) for experts entering a cache: free slots first, then the victims in order."""
    return tuple(zip(entering, [FREE_SLOT] * max(free, 0) + victims, strict=False))


class CacheReplacement:
    """Base class: a replacement answers `update` once per layer and step, in step order."""

    name = "cache"

    def update(
        self, layer: int, step: int, experts: np.ndarray, workloads: np.ndarray, resident: np.ndarray, capacity: int
    ) -> Swaps:
        """Swaps to copy after this step.

        layer: the MoE layer's index; step: how many steps this layer has run before this one;
        experts: int64 [n] the active experts, ascending; workloads: int64 [n] their tokens (>= 1);
        resident: int64 [c] the layer's cached experts at the step's start, ascending; capacity: its slots.
        Returns ((expert, victim), ...), victim FREE_SLOT for a free slot.
        """
        raise NotImplementedError


class Static(CacheReplacement):
    """Never swaps: the cache keeps its initial experts."""

    name = "static"

    def update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        return ()


class WorkloadAware(CacheReplacement):
    """DALI's workload-aware replacement. Per layer, an expert's score is the tokens routed to it during the
    current window of `w_size` steps. At the window's end (after steps w-1, 2w-1, ...), the highest-scoring
    uncached experts fill the free slots, then replace the lowest-scoring cached ones, at most `u_size`
    copies in all; then every score resets to 0.

    The paper leaves ties open, and with a few tokens per window they are the rule (decode: scores of 1 or
    2); they go by recency, the temporal correlation the window exploits: among equal scores the most
    recently used expert comes in first and the least recently used one leaves first (then the lower id).
    An uncached expert never comes in with a score of 0, nor in place of a cached one that scored at least
    as much: such a swap would spend a copy without raising the cache's score.
    """

    name = "workload"

    def __init__(self, w_size: int, u_size: int):
        self.w_size = _check_int("cache 'workload'", "w_size", w_size, 1)
        self.u_size = _check_int("cache 'workload'", "u_size", u_size, 1)
        # The state: with the C++ extension, per layer an int64 [2, E] window (scores, uses) that the C calls
        # (csrc/core/planner.cpp) read and write; without it, the reference's dicts. Chosen once, never mixed.
        self._native: _NativeWindows | None | bool = None  # None: not chosen yet; False: the reference
        self._scores: dict[int, dict[int, int]] = {}  # layer -> expert -> tokens in the current window
        self._last_use: dict[int, dict[int, int]] = {}  # layer -> expert -> its last step + 1 (0: never)

    def native(self) -> _NativeWindows | None:
        """The C path's state and calls, or None where the reference runs (no extension)."""
        if self._native is None:
            from . import cpu_extension

            update, decide = cpu_extension.workload_window_functions()
            self._native = _NativeWindows(self, update, decide) if update else False
        return self._native or None

    def update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        native = self.native()
        if native is not None:
            return native.update(layer, step, experts, workloads, resident, capacity)
        return self.reference_update(layer, step, experts, workloads, resident, capacity)

    def reference_update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        """The rules in Python (on dicts): the specification the C path equals, and the path without it."""
        scores = self._scores.setdefault(layer, {})
        uses = self._last_use.setdefault(layer, {})
        for expert, tokens in zip(experts.tolist(), workloads.tolist(), strict=True):
            scores[expert] = scores.get(expert, 0) + tokens
            uses[expert] = step + 1
        if (step + 1) % self.w_size:
            return ()
        self._scores[layer] = {}
        cached = set(resident.tolist())
        incoming = sorted(
            (e for e, s in scores.items() if e not in cached and s > 0), key=lambda e: (-scores[e], -uses[e], e)
        )[: self.u_size]
        free = capacity - len(cached)
        # Only as many victims as the incoming experts the free slots leave over: none at all in the common
        # window whose experts are all cached (a sort of the whole cache per window was most of this call).
        victims = max(0, len(incoming) - max(free, 0))
        outgoing = heapq.nsmallest(victims, cached, key=lambda e: (scores.get(e, 0), uses.get(e, 0), e))
        swaps = []
        for expert, victim in _pair(incoming, free, outgoing):
            if victim != FREE_SLOT and scores[expert] <= scores.get(victim, 0):
                break  # incoming scores only fall and outgoing ones only rise from here
            swaps.append((expert, victim))
        return tuple(swaps)


class _NativeWindows:
    """WorkloadAware's C path: per layer an int64 [2, E] window (scores, uses; grown as ids need), with the
    addresses of the windows, the step's input buffers and the outputs taken once, and per layer the constant
    arguments of the fused decision packed once (`_context`)."""

    def __init__(self, owner: WorkloadAware, update, decide):
        self.owner = owner
        self.update_function, self.decide_function = update, decide
        from . import cpu_extension

        # The decision reading the LayerStep's arrays themselves (no copies into the buffers), where it exists.
        self.decide_arrays = cpu_extension.python_only_function("dali_decide_workload_arrays")
        self._windows: dict[int, tuple[np.ndarray, int, int]] = {}  # layer -> (window, scores' and uses' address)
        # layer -> (cost table, E, context, its address)
        self._contexts: dict[int, tuple[object, int, np.ndarray, int]] = {}
        self._resident: tuple[np.ndarray | None, int] = (None, 0)  # the last resident array seen, its address
        self.swaps = np.zeros(2 * owner.u_size, dtype=np.int64)
        self._swaps_address = self.swaps.ctypes.data
        self._reserve(0)

    def _reserve(self, n: int) -> None:
        self.capacity = max(n, 256)
        self.inputs = np.zeros((2, self.capacity), dtype=np.int64)  # experts, workloads
        self.flags = np.zeros((2, self.capacity), dtype=np.bool_)  # cached, on_gpu (one byte, 0 or 1, as C reads)
        self.addresses = (self.inputs[0].ctypes.data, self.inputs[1].ctypes.data, self.flags[0].ctypes.data,
                          self.flags[1].ctypes.data)
        self._contexts.clear()  # they name the old buffers

    def window(self, layer: int, num_experts: int) -> tuple[np.ndarray, int, int]:
        known = self._windows.get(layer)
        if known is None or known[0].shape[1] < num_experts:
            window = np.zeros((2, num_experts), dtype=np.int64)
            if known is not None:
                window[:, :known[0].shape[1]] = known[0]
            known = self._windows[layer] = (window, window[0].ctypes.data, window[1].ctypes.data)
            self._contexts.pop(layer, None)
        return known

    def _context(self, layer: int, table, num_experts: int) -> int:
        """The address of layer's context (the layout dali_decide_workload reads), made again when the cost
        table, the buffers or the window change."""
        known = self._contexts.get(layer)
        if known is None or known[0] is not table or known[1] < num_experts:
            window, scores, uses = self.window(layer, num_experts)
            experts, workloads, cached, on_gpu = self.addresses
            context = np.array([table.cpu_address, table.gpu_address, table.key_address, table.top, experts,
                                workloads, cached, on_gpu, scores, uses, window.shape[1], self.owner.w_size,
                                self.owner.u_size, self._swaps_address], dtype=np.int64)
            known = self._contexts[layer] = (table, window.shape[1], context, context.ctypes.data)
        return known[3]

    def _resident_address(self, resident: np.ndarray) -> tuple[np.ndarray, int]:
        """`resident` as contiguous int64 and its address; the runtime's array (the same until its cache changes)
        is looked up once."""
        known, address = self._resident
        if known is not resident:
            array = np.ascontiguousarray(resident, dtype=np.int64)
            address = array.ctypes.data
            if array is resident:
                self._resident = (resident, address)
            else:
                return array, address
        return resident, address

    def _load(self, experts, workloads) -> int:
        n = len(experts)
        if n > self.capacity:
            self._reserve(n)
        self.inputs[0, :n] = experts
        self.inputs[1, :n] = workloads
        return n

    def _swaps(self, taken: int) -> Swaps:
        if not taken:
            return ()
        pairs = self.swaps[: 2 * taken].tolist()
        return tuple(zip(pairs[0::2], pairs[1::2], strict=True))

    def update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        experts, workloads = np.asarray(experts), np.asarray(workloads)
        resident, resident_address = self._resident_address(resident)
        n = self._load(experts, workloads)
        size = 1 + max(int(experts.max(initial=-1)), int(resident.max(initial=-1)))
        window, scores, uses = self.window(layer, size)
        owner = self.owner
        taken = self.update_function(n, self.addresses[0], self.addresses[1], scores, uses, window.shape[1], step,
                                     owner.w_size, owner.u_size, resident_address, len(resident), capacity,
                                     self._swaps_address)
        if taken < 0:
            raise ValueError(f"cache 'workload' (layer {layer}): expert ids must be >= 0")
        return self._swaps(taken)

    def decide(self, layer, step, experts, workloads, cached, table, max_uncached, resident, capacity,
               num_experts) -> tuple[np.ndarray, Swaps] | None:
        """The greedy's on_gpu (planner.greedy_plan over `table`, a CostModel's table) and update's swaps in one
        call; None where the greedy does not apply (a workload past the table): nothing was changed then."""
        if self.decide_arrays is not None:
            got = self.decide_arrays(self._context(layer, table, num_experts), experts, workloads, cached, step,
                                     max_uncached, resident, capacity)
            if got is not None:  # None: arrays of another dtype or layout, copied into the buffers below
                if got == -1:
                    return None
                on_gpu, taken = got
                return np.frombuffer(on_gpu, dtype=np.bool_), self._swaps(taken)
        n = self._load(experts, workloads)
        self.flags[0, :n] = cached
        context = self._context(layer, table, num_experts)
        resident, resident_address = self._resident_address(resident)
        taken = self.decide_function(context, n, step, max_uncached, resident_address, len(resident), capacity)
        if taken < 0:
            return None
        return self.flags[1, :n].copy(), self._swaps(taken)


class _Quota:
    """A per-layer copy allowance of `quota` copies per step on average (a token bucket): each step adds
    `quota` credits to a balance first capped at max(1, quota) (so a quiet stretch buys no burst beyond one
    step's worth, or one copy), and each copy spends one credit. None: no limit."""

    def __init__(self, quota: float | None):
        self.quota = quota
        self._credit: dict[int, float] = {}

    def allowance(self, layer: int) -> int | None:
        if self.quota is None:
            return None
        credit = min(self._credit.get(layer, 0.0), max(1.0, self.quota)) + self.quota
        self._credit[layer] = credit
        return int(credit + 1e-9)  # 4 x 0.25 is a whole copy despite rounding

    def spend(self, layer: int, copies: int) -> None:
        if self.quota is not None:
            self._credit[layer] -= copies


class _CopyOnMiss(CacheReplacement):
    """Copy the step's misses after it (the busiest first, ties to the lower id; within the quota), each into
    a free slot or in place of the resident expert that `_victim_order` puts first. An expert used in this
    step is never evicted for another one used in it: the copy would buy nothing the cache does not have."""

    def __init__(self, quota: float | None = None):
        self._quota = _Quota(_check_quota(f"cache {self.name!r}", quota))

    @property
    def quota(self) -> float | None:
        return self._quota.quota

    def _record(self, layer: int, step: int, experts: np.ndarray, workloads: np.ndarray) -> None:
        raise NotImplementedError

    def _victim_order(self, layer: int, candidates: list[int]) -> list[int]:
        raise NotImplementedError

    def update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        self._record(layer, step, experts, workloads)
        allowed = self._quota.allowance(layer)
        # Python sets and lists: n and c are a handful, where numpy's set routines cost tens of microseconds.
        cached = set(resident.tolist())
        active = experts.tolist()
        misses = [(e, w) for e, w in zip(active, workloads.tolist(), strict=True) if e not in cached]
        entering = [e for e, _ in sorted(misses, key=lambda m: (-m[1], m[0]))][:allowed]
        used = set(active)
        idle = [e for e in cached if e not in used]
        swaps = _pair(entering, capacity - len(cached), self._victim_order(layer, idle))
        self._quota.spend(layer, len(swaps))
        return swaps


class Lru(_CopyOnMiss):
    """Least recently used: the victim is the resident expert whose last step is the oldest (never used,
    i.e. the initial cache, is oldest; ties to the lower id)."""

    name = "lru"

    def __init__(self, quota: float | None = None):
        super().__init__(quota)
        self._last_use: dict[int, dict[int, int]] = {}  # layer -> expert -> its last step + 1

    def _record(self, layer, step, experts, workloads) -> None:
        uses = self._last_use.setdefault(layer, {})
        for expert in experts.tolist():
            uses[expert] = step + 1

    def _victim_order(self, layer, candidates) -> list[int]:
        uses = self._last_use.get(layer, {})
        return sorted(candidates, key=lambda e: (uses.get(e, 0), e))


class Lfu(_CopyOnMiss):
    """Least frequently used: the victim is the resident expert with the fewest tokens routed to it since the
    start (counts are kept for uncached experts too: "perfect" LFU; ties to the least recently used, then the
    lower id)."""

    name = "lfu"

    def __init__(self, quota: float | None = None):
        super().__init__(quota)
        self._tokens: dict[int, dict[int, int]] = {}
        self._last_use: dict[int, dict[int, int]] = {}

    def _record(self, layer, step, experts, workloads) -> None:
        tokens = self._tokens.setdefault(layer, {})
        uses = self._last_use.setdefault(layer, {})
        for expert, count in zip(experts.tolist(), workloads.tolist(), strict=True):
            tokens[expert] = tokens.get(expert, 0) + count
            uses[expert] = step + 1

    def _victim_order(self, layer, candidates) -> list[int]:
        tokens, uses = self._tokens.get(layer, {}), self._last_use.get(layer, {})
        return sorted(candidates, key=lambda e: (tokens.get(e, 0), uses.get(e, 0), e))


class Belady(CacheReplacement):
    """Belady's MIN, offline: after each step, the cache keeps the `capacity` experts among those resident and
    this step's misses that are used again soonest (never again: not kept); ties keep a resident expert, then
    the lower id. It copies only experts just missed (replacement on demand) and as many as it likes.

    future: per layer, per step of that layer (in the order `update` sees them), the active experts. Each
    `update` checks that it is called with exactly that step's experts, so a replay that drifts from the
    future it was given fails loudly.
    """

    name = "belady"

    def __init__(self, future: Sequence[Sequence[Sequence[int]]]):
        self._future = [[np.asarray(s, dtype=np.int64) for s in layer] for layer in future]
        self._uses: list[dict[int, list[int]]] = []  # layer -> expert -> its steps, ascending
        for steps in self._future:
            uses: dict[int, list[int]] = {}
            for index, active in enumerate(steps):
                for expert in active.tolist():
                    uses.setdefault(expert, []).append(index)
            self._uses.append(uses)

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> Belady:
        """The future of a routing given as counts int [S, L, E] (tokens per expert; a layer step without
        tokens is skipped, as the replay skips it)."""
        counts = np.asarray(counts)
        return cls([[np.flatnonzero(row) for row in counts[:, layer] if row.any()] for layer in range(counts.shape[1])])

    def _next_use(self, layer: int, expert: int, step: int) -> float:
        uses = self._uses[layer].get(expert, [])
        i = bisect.bisect_right(uses, step)
        return uses[i] if i < len(uses) else math.inf

    def update(self, layer, step, experts, workloads, resident, capacity) -> Swaps:
        if layer >= len(self._future) or step >= len(self._future[layer]):
            raise ValueError(f"cache 'belady': no future known for layer {layer}, step {step}")
        if not np.array_equal(self._future[layer][step], experts):
            raise ValueError(
                f"cache 'belady': layer {layer} step {step} routes to {experts.tolist()}, but its "
                f"future says {self._future[layer][step].tolist()}: the replay drifted from the trace"
            )
        cached = set(resident.tolist())
        candidates = cached | set(experts.tolist())
        ranked = sorted(candidates, key=lambda e: (self._next_use(layer, e, step), e not in cached, e))
        keep = [e for e in ranked if e in cached or self._next_use(layer, e, step) < math.inf][:capacity]
        entering = [e for e in keep if e not in cached]
        victims = sorted(cached - set(keep), key=lambda e: (-self._next_use(layer, e, step), e))
        return _pair(entering, capacity - len(cached), victims)


CACHE_REPLACEMENTS = ("workload", "static", "lru", "lfu")  # by name; Belady needs its future, so no name


def make_cache_replacement(
    name: str, num_experts: int, *, w_size: int | None = None, u_size: int | None = None, quota: float | None = None
) -> CacheReplacement:
    """The replacement called `name` for layers of `num_experts` experts. `workload` takes w_size and u_size
    (each defaults to `default_window(num_experts)`), `lru` and `lfu` take quota; a misplaced option is a
    ValueError, as is an unknown name."""
    if name not in CACHE_REPLACEMENTS:
        raise ValueError(f"unknown cache replacement {name!r}; known: {', '.join(CACHE_REPLACEMENTS)}")
    if name != "workload" and (w_size is not None or u_size is not None):
        raise ValueError(f"cache {name!r} takes no w_size or u_size (only cache 'workload' does)")
    if name not in ("lru", "lfu") and quota is not None:
        raise ValueError(f"cache {name!r} takes no quota (only 'lru' and 'lfu' do)")
    if name == "workload":
        w, u = default_window(num_experts)
        return WorkloadAware(w if w_size is None else w_size, u if u_size is None else u_size)
    if name == "lru":
        return Lru(quota)
    if name == "lfu":
        return Lfu(quota)
    return Static()

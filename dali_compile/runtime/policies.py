"""Placement policies of the hybrid runtime: DALI and the baselines it is measured against.

# E experts per layer, n active experts in one layer's step, w workload (tokens routed to an expert)

Every policy is a small class behind one interface. The runtime owns the memory (cache slots per
layer, staging slots shared by all layers) and the copies; a policy only decides:

- once, at offload: how the budget's slots are split (`slot_plan`) and what each layer's cache
  holds at start (`initial_cache`);
- per layer and step (`decide`): which active experts run on the GPU, which of those are copied
  into the layer's cache instead of a transient staging slot (`admit`, with the cached expert each
  one evicts), and which experts are copied into the cache in the background after the step
  (`background`, for later steps).

An active expert that runs on the GPU and is neither cached nor admitted goes through a staging
slot. `check_decision` states the rules every decision obeys; the runtime applies it to every
decision, so a policy bug is an error, never a wrong answer or a budget overrun.

`POLICIES` maps each policy's name to its class; `make_policy(name, **options)` builds one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from .cache_replacement import (  # FREE_SLOT: the victim of an admission or swap into a free slot
    CACHE_REPLACEMENTS,
    FREE_SLOT,
    CacheReplacement,
    WorkloadAware,
    make_cache_replacement,
)
from .planner import CostModel, exact_plan, greedy_plan, planned


class PolicyError(RuntimeError):
    """A policy returned a decision that breaks the runtime's rules (a bug in the policy)."""


@dataclass(frozen=True)
class SlotPlan:
    """How a budget of whole expert slots is split: cache slots per MoE layer, and staging slots shared
    by all layers (a GPU expert that is not cached is copied into one of them for its step)."""

    cache_slots: tuple[int, ...]
    staging_slots: int

    @property
    def total(self) -> int:
        return sum(self.cache_slots) + self.staging_slots


@dataclass(frozen=True)
class LayerStep:
    """What a policy sees of one MoE layer's step."""

    layer: int  # the MoE layer's index in the runtime (0 = first MoE layer)
    step: int  # how many steps this layer has run before this one
    experts: np.ndarray  # int64 [n]: the active experts, ascending
    workloads: np.ndarray  # int64 [n]: tokens routed to each (>= 1)
    cached: np.ndarray  # bool [n]: resident in this layer's cache
    resident: np.ndarray  # int64 [c]: every expert in this layer's cache (active or not), ascending
    cache_slots: int  # this layer's cache capacity (c <= cache_slots)
    staging_slots: int  # staging slots this step may use
    num_experts: int  # E
    cost: CostModel | None  # profiled costs (None when the runtime has none: cost-free policies only)


@dataclass(frozen=True)
class Decision:
    on_gpu: np.ndarray  # bool [n], aligned with LayerStep.experts
    # (expert, victim): an active GPU expert of this step copied into the cache, evicting `victim` (a
    # resident expert not on the GPU this step) or filling a free slot (FREE_SLOT).
    admit: tuple[tuple[int, int], ...] = ()
    # (expert, victim): copied into the cache after this step, for later steps; the expert is not
    # resident and not admitted this step.
    background: tuple[tuple[int, int], ...] = ()


class Policy:
    """Base class: decides nothing on its own; subclasses override `decide` (and the slot split)."""

    name = "policy"
    uses_gpu = True  # False: needs no expert memory on the device at all (a zero budget is fine)
    gpu_only = False  # True: every active expert runs on the GPU (needs a budget of at least one slot)
    needs_cost = False  # True: `decide` needs LayerStep.cost (a profiled CostModel)

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        """Default: enough staging slots for one token's experts (at most the budget), the rest of the
        budget spread evenly over the layers' caches (earlier layers take the remainder), at most E per
        layer."""
        staging = min(budget_slots, max(top_k, 1))
        return SlotPlan(spread_evenly(budget_slots - staging, num_layers, num_experts), staging)

    def initial_cache(self, layer: int, num_experts: int, cache_slots: int) -> list[int]:
        """Experts resident at start: the first `cache_slots` (nothing is known about popularity yet)."""
        return list(range(min(cache_slots, num_experts)))

    def decide(self, step: LayerStep) -> Decision:
        raise NotImplementedError


def spread_evenly(slots: int, num_layers: int, num_experts: int) -> tuple[int, ...]:
    """`slots` over `num_layers` caches of at most `num_experts` each; earlier layers take the remainder."""
    if num_layers <= 0:
        return ()
    per_layer, extra = divmod(max(slots, 0), num_layers)
    return tuple(min(num_experts, per_layer + (1 if i < extra else 0)) for i in range(num_layers))


def any_set(mask: np.ndarray) -> bool:
    """mask.any() for a bool array, as a byte compare: numpy's reduction costs ~10 us per decode step on the
    caches the step's weights emptied, this a few."""
    return mask.tobytes() != bytes(mask.size)


def check_decision(step: LayerStep, decision: Decision, policy_name: str = "policy") -> None:
    """Raise PolicyError unless the decision obeys the runtime's rules:

    - on_gpu is bool [n];
    - admitted experts are active, on the GPU, not resident, distinct; their victims are resident, not
      on the GPU this step, distinct (or FREE_SLOT while free slots remain);
    - the GPU experts that are neither resident nor admitted fit the staging slots, unless the policy
      runs them in waves (the runtime does: see `HybridLayer`), so only "none without a staging slot" is
      checked here;
    - background copies name non-resident, non-admitted experts with valid victims (a victim may have run
      on the GPU this step: background copies start after the step's GPU work);
    - the cache never holds more than cache_slots experts.
    """

    def fail(message: str):
        raise PolicyError(f"{policy_name} (layer {step.layer}, step {step.step}): {message}")

    on_gpu = np.asarray(decision.on_gpu)
    if on_gpu.dtype != np.bool_ or on_gpu.shape != step.experts.shape:
        fail(f"on_gpu must be bool {step.experts.shape}, got {on_gpu.dtype} {on_gpu.shape}")
    # Staging: a GPU expert neither on the device for this step (step.cached also covers prefetched ones)
    # nor admitted into the cache runs in a staging slot; waves need at least one.
    if step.staging_slots <= 0 and any_set(on_gpu):  # only GPU experts can need a staging slot
        staged = on_gpu & ~step.cached
        if decision.admit:
            staged &= ~np.isin(step.experts, [int(expert) for expert, _ in decision.admit])
        if staged.any():
            fail(f"experts {sorted(step.experts[staged].tolist())} need staging slots, but this step has none")
    if not decision.admit and not decision.background:
        return  # the common step: no copies into the cache
    active = {int(e): i for i, e in enumerate(step.experts.tolist())}
    resident = set(step.resident.tolist())
    gpu_now = {int(e) for e, g in zip(step.experts.tolist(), on_gpu.tolist(), strict=True) if g}
    free = step.cache_slots - len(resident)
    evicted: set[int] = set()
    entering: set[int] = set()

    def take(expert: int, victim: int, what: str) -> None:
        nonlocal free
        if expert in resident or expert in entering:
            fail(f"{what} expert {expert} is already cached or entering")
        if victim == FREE_SLOT:
            if free <= 0:
                fail(f"{what} expert {expert} into a free slot, but the cache ({step.cache_slots} slots) is full")
            free -= 1
        else:
            if victim not in resident or victim in evicted:
                fail(f"{what} expert {expert} evicts {victim}, which is not (or no longer) cached")
            if what == "admitted" and victim in gpu_now:
                fail(f"{what} expert {expert} evicts {victim}, which runs on the GPU this step")
            evicted.add(victim)
        entering.add(expert)

    for expert, victim in decision.admit:
        if expert not in active or expert not in gpu_now:
            fail(f"admitted expert {expert} is not an active GPU expert of this step")
        take(int(expert), int(victim), "admitted")
    for expert, victim in decision.background:
        if not 0 <= expert < step.num_experts:
            fail(f"background expert {expert} out of range [0, {step.num_experts})")
        take(int(expert), int(victim), "background")


# ---------------------------------------------------------------------------------------------------
# The policies. Stateful ones (LRU order) keep one state per layer; the runtime makes one instance per
# model, so nothing is shared between models.


def _int_option(policy: str, option: str, value, minimum: int) -> int:
    # bool is an int in Python, but `quota=True` is a mistake, not a quota of one.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"policy {policy!r}: option {option} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _needs_budget(policy: str, budget_slots: int) -> None:
    if budget_slots < 1:
        raise ValueError(f"policy {policy!r} runs every active expert on the GPU: it needs a budget of >= 1 slot")


class _Recency:
    """When each expert of each layer was last routed to: the LRU order of the policy's own view (the
    runtime owns the cache itself, so the resident set always comes from the LayerStep)."""

    def __init__(self):
        self._clock = 0
        self._last_use: dict[int, dict[int, int]] = {}

    def touch(self, layer: int, experts) -> None:
        self._clock += 1
        uses = self._last_use.setdefault(layer, {})
        for expert in experts:
            uses[int(expert)] = self._clock

    def oldest_first(self, layer: int, experts) -> list[int]:
        """`experts` ordered least recently used first; never-used ones (the initial cache) are oldest,
        ties go to the lower id."""
        uses = self._last_use.get(layer, {})
        return sorted((int(e) for e in experts), key=lambda e: (uses.get(e, 0), e))


def _pair_with_slots(entering: list[int], free: int, victims: list[int]) -> tuple[tuple[int, int], ...]:
    """(expert, victim) for experts entering a cache: free slots first, then the victims in order; experts
    beyond both get none (the caller decides what happens to them)."""
    slots = [FREE_SLOT] * max(free, 0) + victims
    return tuple(zip(entering, slots, strict=False))


def _busiest_first(experts: np.ndarray, workloads: np.ndarray) -> list[int]:
    """Experts by workload descending, ties to the lower id (experts arrive ascending; the sort is stable)."""
    return [int(e) for e in experts[np.argsort(-workloads, kind="stable")]]


def break_even_tokens(cost: CostModel, limit: int = 4096) -> int | None:
    """The smallest workload w in 1..limit at which an uncached expert is no slower on the GPU (copy
    included) than on the CPU: t_cpu(w) >= max(transfer, t_gpu(w)); None if there is none."""
    w = np.arange(1, limit + 1)
    worth_it = np.flatnonzero(cost.t_cpu(w) >= np.maximum(cost.transfer_seconds, cost.t_gpu(w)))
    return int(w[worth_it[0]]) if len(worth_it) else None


class DaliPolicy(Policy):
    """DALI (arXiv 2602.03495): per layer and step, the greedy CPU/GPU assignment of `planner.greedy_plan`
    (or the exact optimum with `exact=True`), with at most `staging_slots` uncached experts on the GPU; and
    the cache replacement `cache` (see `cache_replacement`), whose swaps are copied in the background after
    the step:

    - "workload" (default): DALI's workload-aware replacement: each expert's tokens summed over a window of
      `w_size` steps; at the window's end up to `u_size` of the highest-scoring uncached experts replace the
      lowest-scoring cached ones. Both default by the layers' expert count E (`default_window`): (4, 1) for
      E = 8 (Mixtral), (4, 8) for E >= 64 (DeepSeek-V2-Lite, Qwen3-30B-A3B), u = E // 8 in between.
    - "static": the initial cache (the first experts of each layer) for good; no copies into it.
    - "lru", "lfu": copy every miss after its step, evicting the least recently / frequently used.
    - a `CacheReplacement` instance (e.g. `Belady` in a trace replay): used as is.

    A swap may evict an expert that ran on the GPU in this step: background copies start after its GPU work.

    Copy budget (`swap_budget=True`, the default): the background swaps of a layer get only the copy stream's
    idle time since that layer's previous swaps, estimated from the plan of the step that issues them
    (steps since then x (makespan - the step's own copies)), in whole copies, the best-scoring swaps first.
    Without it a swap's copy delays the copies later steps need: on routing with little temporal locality
    (the FLAME trace, 64 experts) the paper's u = 8 swaps kept PCIe 75-78% busy and dali at 0.54x the
    threshold policy in `benchmarks/simulate_pc.py`; `swap_budget=False` is the paper's rule as published.

    Slot split: the default (top_k staging slots, the rest spread over the layers' caches).
    """

    name = "dali"
    needs_cost = True

    def __init__(
        self,
        *,
        exact: bool = False,
        cache: str | CacheReplacement = "workload",
        w_size: int | None = None,
        u_size: int | None = None,
        swap_budget: bool = True,
    ):
        if not isinstance(exact, bool):
            raise ValueError(f"policy 'dali': option exact must be a bool, got {exact!r}")
        if not isinstance(swap_budget, bool):
            raise ValueError(f"policy 'dali': option swap_budget must be a bool, got {swap_budget!r}")
        self.exact = exact
        self.swap_budget = swap_budget
        self._last_swaps: dict[int, int] = {}  # layer -> the step that last issued background swaps
        if isinstance(cache, CacheReplacement):
            if w_size is not None or u_size is not None:
                raise ValueError("policy 'dali': options w_size and u_size apply to cache='workload' only")
            self.replacement: CacheReplacement | None = cache
        else:
            if cache not in CACHE_REPLACEMENTS:
                raise ValueError(
                    f"policy 'dali': option cache must be one of {', '.join(CACHE_REPLACEMENTS)} or a "
                    f"CacheReplacement, got {cache!r}"
                )
            if cache != "workload" and (w_size is not None or u_size is not None):
                raise ValueError(
                    f"policy 'dali': options w_size and u_size apply to cache='workload' only, not cache={cache!r}"
                )
            for option, value in (("w_size", w_size), ("u_size", u_size)):
                if value is not None:
                    _int_option(self.name, option, value, 1)
            self.replacement = None  # built once E is known (slot_plan or the first step)
        self.cache = cache if isinstance(cache, str) else cache.name
        self._options = {"w_size": w_size, "u_size": u_size}

    def _replacement_for(self, num_experts: int) -> CacheReplacement:
        if self.replacement is None:
            options = self._options if self.cache == "workload" else {}
            self.replacement = make_cache_replacement(self.cache, num_experts, **options)
        return self.replacement

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        self._replacement_for(num_experts)
        return super().slot_plan(budget_slots, num_layers, num_experts, top_k)

    def decide(self, step: LayerStep) -> Decision:
        if step.cost is None:
            raise ValueError("policy 'dali' needs a profiled cost model, but LayerStep.cost is None")
        replacement = self._replacement_for(step.num_experts)
        native = replacement.native() if not self.exact and type(replacement) is WorkloadAware else None
        decided = None
        if native is not None and step.staging_slots >= 0:  # the greedy and the window in one C call
            decided = native.decide(step.layer, step.step, step.experts, step.workloads, step.cached,
                                    step.cost._table, step.staging_slots, step.resident, step.cache_slots,
                                    step.num_experts)
        if decided is not None:
            on_gpu, swaps = decided
            plan = None
        else:
            plan_fn = exact_plan if self.exact else greedy_plan
            plan = plan_fn(step.experts, step.workloads, step.cached, step.cost, max_uncached_on_gpu=step.staging_slots)
            on_gpu = plan.on_gpu
            swaps = replacement.update(step.layer, step.step, step.experts, step.workloads, step.resident,
                                       step.cache_slots)
        if swaps and self.swap_budget:
            plan = plan or planned(step.experts, step.workloads, step.cached, on_gpu, step.cost)
            swaps = self._within_idle_copy_time(step, plan, swaps)
        return Decision(on_gpu, (), swaps)  # positional: keywords cost a frozen dataclass ~1 us more

    def _within_idle_copy_time(self, step: LayerStep, plan, swaps: tuple) -> tuple:
        """The first swaps whose copies fit the copy stream's idle time since this layer's last swaps."""
        steps = step.step - self._last_swaps.get(step.layer, -1)
        transfer = step.cost.transfer_seconds
        own_copies = int(np.count_nonzero(plan.on_gpu & ~step.cached)) * transfer
        idle = max(0.0, plan.makespan - own_copies)
        fitting = steps * idle / transfer + 1e-9 if transfer > 0 else float("inf")
        chosen = swaps if fitting >= len(swaps) else swaps[: int(fitting)]
        if chosen:  # the idle time spent; none issued: it keeps adding up until the next proposal
            self._last_swaps[step.layer] = step.step
        return chosen


class AllCpuPolicy(Policy):
    """Every expert on the CPU (KTransformers without GPU experts): the floor every GPU policy must beat.

    Slot split: nothing, for any budget (zero included).
    """

    name = "all_cpu"
    uses_gpu = False

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        return SlotPlan((0,) * num_layers, 0)

    def decide(self, step: LayerStep) -> Decision:
        return Decision(np.zeros(len(step.experts), dtype=bool))


class LayerwisePolicy(Policy):
    """Layer-wise static split (llama.cpp `--n-cpu-moe`, KTransformers): the first N MoE layers keep all
    their experts on the GPU, the others run on the CPU.

    Slot split: N = the number of whole layers whose E experts fit the budget (at most all layers); E cache
    slots for each of the first N layers, 0 for the rest, no staging. A partial layer gets nothing: the
    baseline moves whole layers.
    """

    name = "layerwise"

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        gpu_layers = min(num_layers, max(budget_slots, 0) // num_experts)
        return SlotPlan((num_experts,) * gpu_layers + (0,) * (num_layers - gpu_layers), 0)

    def decide(self, step: LayerStep) -> Decision:
        return Decision(step.cached.copy())  # a GPU layer caches everything, a CPU layer nothing


class OnDemandPolicy(Policy):
    """On-demand loading (accelerate `device_map` offload): every active expert is copied to the GPU for its
    step and dropped after; no cache.

    Slot split: the whole budget is staging (at most E, more is never used), no cache.
    """

    name = "on_demand"
    gpu_only = True

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        _needs_budget(self.name, budget_slots)
        return SlotPlan((0,) * num_layers, min(budget_slots, num_experts))

    def decide(self, step: LayerStep) -> Decision:
        return Decision(np.ones(len(step.experts), dtype=bool))


class LruPolicy(Policy):
    """LRU expert cache with copy on miss (mixtral-offloading): every active expert runs on the GPU; a miss
    is copied into the layer's cache (a free slot first, else evicting the least recently used expert not
    active this step), busiest misses first; misses left without a slot go through staging.

    Slot split: the default (top_k staging slots, the rest spread over the layers' caches).
    """

    name = "lru"
    gpu_only = True

    def __init__(self):
        self._recency = _Recency()

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        _needs_budget(self.name, budget_slots)
        return super().slot_plan(budget_slots, num_layers, num_experts, top_k)

    def decide(self, step: LayerStep) -> Decision:
        # Victims are chosen before this step's use is recorded, so "least recently used" means before now.
        idle = np.setdiff1d(step.resident, step.experts)
        victims = self._recency.oldest_first(step.layer, idle)
        self._recency.touch(step.layer, step.experts)
        misses = ~step.cached
        admit = _pair_with_slots(
            _busiest_first(step.experts[misses], step.workloads[misses]),
            step.cache_slots - len(step.resident),
            victims,
        )
        return Decision(np.ones(len(step.experts), dtype=bool), admit=admit)


class CacheCpuMissPolicy(Policy):
    """Expert cache with CPU execution on a miss (arXiv 2512.16473): hits run on the GPU, misses on the CPU;
    after the step, up to `quota` misses (busiest first, ties to the lower id) are copied in the background
    into the layer's cache for later tokens, each into a free slot or evicting the least recently used
    expert (hits count as uses).

    Slot split: the whole budget spread over the layers' caches, no staging (a miss never runs on the GPU
    in its own step).
    """

    name = "cache_cpu_miss"

    def __init__(self, *, quota: int = 1):
        self.quota = _int_option(self.name, "quota", quota, 0)
        self._recency = _Recency()

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        return SlotPlan(spread_evenly(budget_slots, num_layers, num_experts), 0)

    def decide(self, step: LayerStep) -> Decision:
        # Hits become the most recent before victims are chosen; misses are touched too, which only
        # matters once one is copied in (it was used this step, on the CPU).
        self._recency.touch(step.layer, step.experts)
        misses = ~step.cached
        wanted = _busiest_first(step.experts[misses], step.workloads[misses])[: self.quota]
        background = _pair_with_slots(
            wanted, step.cache_slots - len(step.resident), self._recency.oldest_first(step.layer, step.resident)
        )
        return Decision(step.cached.copy(), background=background)


class ThresholdPolicy(Policy):
    """Static workload threshold (Fiddler, HybriMoE): cached experts run on the GPU; an uncached expert
    with at least `min_tokens` tokens is copied to the GPU while staging slots remain (busiest first), the
    rest run on the CPU. Without `min_tokens`, the threshold is the cost model's break-even workload
    (`break_even_tokens`); if the copy never pays off, only cached experts use the GPU.

    Slot split: the default (top_k staging slots, the rest spread over the layers' caches); static cache.
    """

    name = "threshold"

    def __init__(self, *, min_tokens: int | None = None):
        self.min_tokens = None if min_tokens is None else _int_option(self.name, "min_tokens", min_tokens, 1)
        self.needs_cost = min_tokens is None
        self._derived: tuple[CostModel, float] | None = None  # (cost model, its threshold), computed once

    def threshold(self, cost: CostModel | None) -> float:
        if self.min_tokens is not None:
            return self.min_tokens
        if cost is None:
            raise ValueError("policy 'threshold' needs option min_tokens or a profiled cost model (LayerStep.cost)")
        if self._derived is None or self._derived[0] != cost:
            tokens = break_even_tokens(cost)
            self._derived = (cost, float("inf") if tokens is None else tokens)
        return self._derived[1]

    def decide(self, step: LayerStep) -> Decision:
        on_gpu = step.cached.copy()
        heavy = ~step.cached & (step.workloads >= self.threshold(step.cost))
        index = np.flatnonzero(heavy)[np.argsort(-step.workloads[heavy], kind="stable")]
        on_gpu[index[: step.staging_slots]] = True
        return Decision(on_gpu)


DEFAULT_POLICY = "dali"
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        DaliPolicy,
        AllCpuPolicy,
        LayerwisePolicy,
        OnDemandPolicy,
        LruPolicy,
        CacheCpuMissPolicy,
        ThresholdPolicy,
    )
}


def make_policy(name: str, **options) -> Policy:
    """The policy registered as `name`, built with its keyword options; ValueError for an unknown name, an
    option the policy does not take, or a bad option value."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = f"its options are {', '.join(accepted)}" if accepted else "it takes no options"
        raise ValueError(f"policy {name!r} has no option {', '.join(unknown)}; {takes}")
    return cls(**options)

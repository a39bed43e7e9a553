"""Trace replay: drive the runtime's policies with recorded routing, without a model or a device.

# S steps, L MoE layers, E experts per layer, K top-k, B tokens per step, n active experts in a layer's step

Routing comes as counts int64 [S, L, E]: the tokens routed to each expert of each layer at each step
(`counts_from_trace` builds them from expert ids [T, L, K] in steps of B tokens, `counts_from_loads` from
per-step, per-layer {expert: tokens}). A layer step without a token (missing trace rows) is skipped: the
layer's step counter does not advance, as if the step had not happened.

`replay_policy` does what the runtime does with a `Policy` (see `hybrid.HybridRuntime`): split the budget
(`slot_plan`), fill each layer's cache (`initial_cache`), then per step and layer build the `LayerStep` from
the resident set, ask for a decision, check it (`check_decision`), and apply its admissions and background
copies to the resident set. It counts what the runtime's `LayerStats` count (hits, misses, copies, CPU and
GPU experts) plus the copies of every step and, given a cost model, the planned makespans.

`replay_cache` replays a bare `CacheReplacement` over caches of a given size through the same machinery
(a policy that runs nothing on the GPU and only swaps), for hit-rate comparisons.

Prefetching: `prefetch(s, l, resident)`, when given, is asked at the start of layer l - 1's step (as the runtime
prefetches from the previous layer's gate input) which experts are copied ahead for layer l's step s; they
must not be resident, and the policy sees them as cached (as the runtime shows them). A trace has no hidden
states to predict from: the predictions come from elsewhere (e.g. a model's recorded gate inputs).
Not modelled here: time (copies finish before the next step; `simulator.simulate` adds it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .cache_replacement import CacheReplacement
from .planner import CostModel, _tabulated_costs
from .policies import FREE_SLOT, Decision, LayerStep, Policy, PolicyError, SlotPlan, check_decision


def _check_ids(ids: np.ndarray, num_experts: int, what: str) -> None:
    """Expert ids must be < E; negative ids mark missing entries."""
    if ids.size and int(ids.max()) >= num_experts:
        where = np.argwhere(ids >= num_experts)[0].tolist()
        raise ValueError(
            f"{what}: expert id {int(ids.max())} (first bad entry at index {where}) is out of range for layers of "
            f"{num_experts} experts (ids 0..{num_experts - 1}); is num_experts right for this trace?"
        )


def counts_from_trace(ids: np.ndarray, num_experts: int, batch: int = 1) -> np.ndarray:
    """Routing counts int64 [S, L, E] from expert ids int [T, L, K] (negative: missing), in steps of `batch`
    consecutive tokens: S = T // batch (a last, partial step is dropped). ValueError for an id >= E."""
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"trace expert ids must be [T, L, K], got shape {ids.shape}")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    _check_ids(ids, num_experts, "trace")
    steps, num_layers = ids.shape[0] // batch, ids.shape[1]
    ids = ids[: steps * batch].astype(np.int64)
    counts = np.zeros((steps, num_layers, num_experts), dtype=np.int64)
    token, layer, _ = np.nonzero(ids >= 0)
    np.add.at(counts, (token // batch, layer, ids[ids >= 0]), 1)
    return counts


def counts_from_loads(steps: Sequence[Sequence[Mapping[int, int]]], num_experts: int) -> np.ndarray:
    """Routing counts int64 [S, L, E] from steps[s][l] = {expert: tokens} (every step has the same layers)."""
    num_layers = len(steps[0]) if len(steps) else 0
    counts = np.zeros((len(steps), num_layers, num_experts), dtype=np.int64)
    for s, layers in enumerate(steps):
        if len(layers) != num_layers:
            raise ValueError(f"step {s} has {len(layers)} layers, step 0 has {num_layers}")
        for layer, loads in enumerate(layers):
            for expert, tokens in loads.items():
                _check_ids(np.array([expert]), num_experts, f"step {s} layer {layer}")
                if expert < 0 or tokens < 0:
                    raise ValueError(f"step {s} layer {layer}: expert {expert} with {tokens} tokens")
                counts[s, layer, expert] += tokens
    return counts


@dataclass
class PolicyReplay:
    """What a policy did over a routing, with the runtime's counters (see `stats.LayerStats`)."""

    plan: SlotPlan
    caches: list[set[int]]  # per layer: the resident experts at the end
    steps: int = 0  # steps replayed (S)
    layer_steps: int = 0  # (step, layer) pairs with routing: the policy's decisions
    tokens: int = 0  # (token, expert) pairs routed
    hits: int = 0  # active experts resident in the cache at their step's start (prefetched ones not counted)
    misses: int = 0
    prefetches: int = 0  # experts copied ahead (replay_policy's `prefetch`)
    prefetch_hits: int = 0  # of those, active in the step they were copied for
    experts_cpu: int = 0  # active experts run on the CPU
    experts_gpu: int = 0
    tokens_cpu: int = 0  # (token, expert) pairs computed on the CPU
    tokens_gpu: int = 0
    admitted: int = 0  # misses copied into the cache for their own step
    staged: int = 0  # misses copied into a staging slot for their own step
    background: int = 0  # copies into the cache after a step
    evictions: int = 0
    copies_per_step: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # int64 [S]
    makespan_s: float = 0.0  # sum over layer steps of the decision's makespan (when a cost model is given)
    trace: list[tuple[LayerStep, Decision]] = field(default_factory=list)  # with keep_trace=True

    @property
    def copies(self) -> int:
        """Every expert copied to the device: staging, admissions, background (the runtime's `copies`)."""
        return self.admitted + self.staged + self.background

    @property
    def cache_copies(self) -> int:
        """Copies into the caches (admissions and background): the replacement's copies."""
        return self.admitted + self.background

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0


def _check_plan(policy: Policy, plan: SlotPlan, budget_slots: int, num_layers: int, num_experts: int) -> None:
    if len(plan.cache_slots) != num_layers or plan.total > budget_slots or plan.staging_slots < 0:
        raise PolicyError(f"{policy.name}: planned {plan} for {num_layers} layers, over the budget of {budget_slots}")
    if not all(0 <= slots <= num_experts for slots in plan.cache_slots):
        raise PolicyError(f"{policy.name}: planned {plan}, a cache outside 0..{num_experts} slots")


def _initial_caches(policy: Policy, plan: SlotPlan, num_experts: int) -> list[set[int]]:
    caches = []
    for layer, slots in enumerate(plan.cache_slots):
        initial = [int(e) for e in policy.initial_cache(layer, num_experts, slots)]
        if len(set(initial)) != len(initial) or len(initial) > slots or not all(0 <= e < num_experts for e in initial):
            raise PolicyError(f"{policy.name}: initial cache {initial} of layer {layer} does not fit {slots} slots")
        caches.append(set(initial))
    return caches


def replay_policy(
    policy: Policy,
    counts: np.ndarray,
    *,
    budget_slots: int,
    top_k: int,
    cost: CostModel | None = None,
    keep_trace: bool = False,
    observe: Callable[[LayerStep, Decision], None] | None = None,
    prefetch: Callable[[int, int, np.ndarray], np.ndarray] | None = None,
) -> PolicyReplay:
    """Replay routing counts int [S, L, E] through `policy` as the runtime would with a budget of
    `budget_slots` expert slots. `cost` is what LayerStep.cost carries (and prices each decision's makespan);
    `observe(step, decision)` is called after each checked decision, before it is applied; keep_trace=True
    keeps every (LayerStep, Decision); `prefetch(s, l, resident bool [E])` (see the module docstring) is
    asked before layer l - 1 decides. A decision that breaks the runtime's rules raises PolicyError."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or np.any(counts < 0):
        raise ValueError(f"routing counts must be non-negative int [S, L, E], got shape {counts.shape}")
    num_steps, num_layers, num_experts = counts.shape
    plan = policy.slot_plan(budget_slots, num_layers, num_experts, top_k)
    _check_plan(policy, plan, budget_slots, num_layers, num_experts)
    caches = _initial_caches(policy, plan, num_experts)
    run = PolicyReplay(plan, caches, steps=num_steps, copies_per_step=np.zeros(num_steps, dtype=np.int64))
    layer_steps = [0] * num_layers
    resident = np.zeros((num_layers, num_experts), dtype=bool)
    for layer, cache in enumerate(caches):
        resident[layer, list(cache)] = True
    for s in range(num_steps):
        prefetched = np.zeros(0, dtype=np.int64)  # for this layer's step, issued by the previous layer
        for layer in range(num_layers):
            experts = np.flatnonzero(counts[s, layer])
            incoming, prefetched = prefetched, prefetched[:0]
            if not len(experts):  # no step, no prefetch from it
                continue
            if layer + 1 < num_layers:
                prefetched = _prefetched(prefetch, s, layer + 1, resident)
            in_cache = resident[layer, experts]
            step = LayerStep(
                layer=layer,
                step=layer_steps[layer],
                experts=experts,
                workloads=counts[s, layer, experts],
                cached=in_cache | np.isin(experts, incoming) if len(incoming) else in_cache,
                resident=np.flatnonzero(resident[layer]),
                cache_slots=plan.cache_slots[layer],
                staging_slots=plan.staging_slots,
                num_experts=num_experts,
                cost=cost,
            )
            decision = policy.decide(step)
            check_decision(step, decision, policy.name)
            if observe is not None:
                observe(step, decision)
            if keep_trace:
                run.trace.append((step, decision))
            _count(run, s, step, decision, cost, in_cache)
            run.prefetches += len(incoming)
            run.prefetch_hits += int(np.isin(incoming, experts).sum())
            for expert, victim in decision.admit + decision.background:
                if victim != FREE_SLOT:
                    resident[layer, victim] = False
                    caches[layer].discard(int(victim))
                resident[layer, expert] = True
                caches[layer].add(int(expert))
            layer_steps[layer] += 1
    return run


def _prefetched(prefetch, s: int, layer: int, resident: np.ndarray) -> np.ndarray:
    """The experts `prefetch` copies ahead for `layer`'s step s: distinct, in range, not resident."""
    if prefetch is None:
        return np.zeros(0, dtype=np.int64)
    chosen = np.asarray(prefetch(s, layer, resident[layer].copy()), dtype=np.int64).reshape(-1)
    if len(np.unique(chosen)) != len(chosen) or np.any(chosen < 0) or np.any(chosen >= resident.shape[1]):
        raise ValueError(f"prefetch for step {s} layer {layer}: experts must be distinct ids < E, got {chosen}")
    if np.any(resident[layer, chosen]):
        raise ValueError(f"prefetch for step {s} layer {layer}: {chosen[resident[layer, chosen]]} already resident")
    return chosen


def _count(run: PolicyReplay, s: int, step: LayerStep, decision: Decision, cost: CostModel | None,
           in_cache: np.ndarray) -> None:
    # Python lists: a step has a handful of experts, where numpy's reductions cost microseconds each.
    on_gpu, cached = np.asarray(decision.on_gpu).tolist(), step.cached.tolist()
    n, hits, gpu = len(cached), int(in_cache.sum()), sum(on_gpu)
    staged = sum(g and not c for g, c in zip(on_gpu, cached, strict=True)) - len(decision.admit)
    run.layer_steps += 1
    workloads = step.workloads.tolist()
    tokens, gpu_tokens = sum(workloads), sum(w for w, g in zip(workloads, on_gpu, strict=True) if g)
    run.tokens += tokens
    run.tokens_gpu += gpu_tokens
    run.tokens_cpu += tokens - gpu_tokens
    run.hits += hits
    run.misses += n - hits
    run.experts_gpu += gpu
    run.experts_cpu += n - gpu
    run.admitted += len(decision.admit)
    run.staged += staged
    run.background += len(decision.background)
    run.evictions += sum(victim != FREE_SLOT for _, victim in decision.admit + decision.background)
    run.copies_per_step[s] += len(decision.admit) + staged + len(decision.background)
    if cost is not None:
        run.makespan_s += decision_makespan(step, decision.on_gpu, cost)


def decision_makespan(step: LayerStep, on_gpu: np.ndarray, cost: CostModel) -> float:
    """max(T_cpu, T_gpu) of an assignment of the step's experts (bool [n]) under `cost`, as
    `planner.plan_times` prices it, from the cost model's tables (a replay prices every step)."""
    cpu, gpu, _ = _tabulated_costs(step.workloads, step.cached, cost)
    t_cpu = t_gpu = 0.0
    for c, g, placed in zip(cpu.tolist(), gpu.tolist(), np.asarray(on_gpu).tolist(), strict=True):
        if placed:
            t_gpu += g
        else:
            t_cpu += c
    return max(t_cpu, t_gpu)


class CacheOnlyPolicy(Policy):
    """A bare cache replacement as a policy: every layer's cache has `capacity` slots (at most E) and its
    initial experts are the first ones (as every policy's), nothing runs on the GPU, and the replacement's
    swaps are the background copies. Hits and copies are then the replacement's alone.

    Slot split: `capacity` cache slots per layer, no staging (the budget must hold them).
    """

    name = "cache_only"
    needs_cost = False

    def __init__(self, replacement: CacheReplacement, capacity: int):
        self.replacement = replacement
        self.capacity = capacity
        self.name = f"cache {replacement.name!r}"

    def slot_plan(self, budget_slots: int, num_layers: int, num_experts: int, top_k: int) -> SlotPlan:
        return SlotPlan((min(self.capacity, num_experts),) * num_layers, 0)

    def decide(self, step: LayerStep) -> Decision:
        swaps = self.replacement.update(
            step.layer, step.step, step.experts, step.workloads, step.resident, step.cache_slots
        )
        return Decision(np.zeros(len(step.experts), dtype=bool), background=swaps)


def replay_cache(replacement: CacheReplacement, counts: np.ndarray, *, capacity: int, **options) -> PolicyReplay:
    """Replay routing counts int [S, L, E] through a bare cache replacement, each layer's cache holding
    `capacity` experts (the first ones at start). The swaps obey `Decision.background`'s rules (else
    PolicyError); options go to `replay_policy` (keep_trace, observe)."""
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
    counts = np.asarray(counts)
    budget = counts.shape[1] * min(capacity, counts.shape[2]) if counts.ndim == 3 else 0
    return replay_policy(CacheOnlyPolicy(replacement, capacity), counts, budget_slots=budget, top_k=0, **options)

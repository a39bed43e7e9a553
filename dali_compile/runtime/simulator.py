"""Simulated PCs: a policy's decode and prefill time over recorded routing, on modelled hardware.

# S steps, L MoE layers, E experts per layer, K top-k, B tokens per step, w workload (tokens of one expert)

No GPU has been lent to this project, so the hybrid runtime's speed is modelled: `simulate` replays routing
counts [S, L, E] through the real `Policy` with `replay.replay_policy` (the same planner, cache replacement and
checks as the runtime) and times every layer step the way `hybrid.HybridLayer` executes it, on three
resources that run concurrently (the CPU's cores, the GPU's compute stream, the one copy stream):

1. the layer's non-expert part (attention, router, shared experts) on the GPU: the weights read once,
   or its FLOPs, whichever takes longer (`dense_seconds`);
2. the host's work of the layer step (routing to the host, counting, the policy, launches, the combine:
   `HardwareProfile.host_layer_s`, measured on our runtime) before any expert starts;
3. CPU experts one after another on all cores, in one call: sum of t_cpu(w), the call's fixed part
   (`CostModel.cpu_call_seconds`) counted once;
4. GPU experts already resident (cached or prefetched) first; the copied ones (admitted or staged) on the
   copy stream in order, each computed once its copy has landed; a staged copy waits until the staging slot
   it reuses is free (the compute of the expert `staging_slots` before it), as the runtime's double buffer;
5. the step's background copies queue on the copy stream after its GPU work (they delay later copies);
6. prefetch for the next layer (when a prediction is given) is issued at the start of this layer's host
   work (the runtime's first action of a step), on the copy stream, and its experts count as resident in the
   next layer's step, computed once they have landed;
7. the layer ends when the CPU and the GPU are both done; the next layer starts then.

Per expert: t_cpu(w) = max(bytes / cpu_bandwidth, w * flop / cpu_flop_rate) plus the CPU call's fixed part
(`HardwareProfile.cpu_call_s`, 0 where a profile does not state it), t_gpu(w) likewise plus one kernel
launch, a copy = bytes / PCIe bandwidth (`HardwareProfile.cost_model`, also what the policies see); or a
given cost model's tables, such as the one a runtime profiled (`benchmarks/validate_simulator.py` replays
a runtime's own run with it).

Not modelled: the lm_head, embedding and sampling (the same for every policy; they lower all tokens/s
alike); contention between the CPU experts and the host's own work for cores and memory bandwidth;
copies slowing the GPU's memory; the KV cache's growth within a run; chunking of very large prefills.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from .planner import CostModel, _tabulated_costs
from .policies import Decision, LayerStep, Policy
from .prefetch import prefetch_choice
from .replay import PolicyReplay, replay_policy

PROFILE_DIR = Path(__file__).with_name("hardware")
# (step, layer) -> the predicted workload of that layer's step: tokens per expert [E], routing weight per expert [E]
Prediction = Callable[[int, int], tuple[np.ndarray, np.ndarray]]
PROFILED_WORKLOADS = tuple(2**i for i in range(13))  # 1 .. 4096, as a warm-up profile would time them


@dataclass(frozen=True)
class HardwareProfile:
    """A PC's rates, in bytes, FLOPs and seconds (the data files in `hardware/` state their sources)."""

    name: str
    description: str
    sources: tuple[str, ...]
    cpu_bytes_per_s: float  # expert weights read by the CPU experts, all cores together
    cpu_flop_per_s: float
    gpu_bytes_per_s: float
    gpu_flop_per_s: float
    pcie_bytes_per_s: float  # host-to-device copies of expert weights
    gpu_kernel_s: float  # one kernel launch's fixed cost
    host_layer_s: float  # the host's work per MoE layer step (see the module docstring)
    gpu_memory_bytes: float  # the device's memory (what `expert_budget_slots` splits)
    cpu_call_s: float = 0.0  # a CPU-experts call's fixed part (dispatch, the threads' start and join); optional

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"hardware profile {self.name!r}: {f.name} must be a finite number >= 0, "
                                 f"got {value!r}")
        for name in ("cpu_bytes_per_s", "cpu_flop_per_s", "gpu_bytes_per_s", "gpu_flop_per_s", "pcie_bytes_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hardware profile {self.name!r}: {name} must be > 0")

    @classmethod
    def from_json(cls, path: str | Path) -> HardwareProfile:
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        optional = {f.name for f in fields(cls) if f.default is not dataclasses.MISSING}
        missing, unknown = known - optional - set(data), set(data) - known
        if missing or unknown:
            raise ValueError(f"hardware profile {path}: missing fields {sorted(missing)}, unknown {sorted(unknown)}")
        data["sources"] = tuple(data["sources"])
        return cls(**{k: (float(v) if isinstance(v, int) else v) for k, v in data.items()})

    def with_host_layer_s(self, seconds: float) -> HardwareProfile:
        return dataclasses.replace(self, host_layer_s=seconds)

    def cost_model(self, expert_bytes: int, flop_per_token: int) -> CostModel:
        """The roofline of one expert (see the module docstring), tabulated at PROFILED_WORKLOADS."""
        w = np.asarray(PROFILED_WORKLOADS, dtype=np.float64)
        cpu = np.maximum(expert_bytes / self.cpu_bytes_per_s, w * flop_per_token / self.cpu_flop_per_s)
        gpu = np.maximum(expert_bytes / self.gpu_bytes_per_s, w * flop_per_token / self.gpu_flop_per_s)
        return CostModel(PROFILED_WORKLOADS, tuple((cpu + self.cpu_call_s).tolist()),
                         tuple((gpu + self.gpu_kernel_s).tolist()), expert_bytes / self.pcie_bytes_per_s,
                         self.cpu_call_s)


def expert_budget_slots(profile: HardwareProfile, resident_bytes: int, expert_bytes: int, num_experts_total: int,
                        reserve_bytes: int = 2 * 2**30) -> int:
    """Expert slots that fit the device beside `resident_bytes` of non-expert weights and `reserve_bytes` for the
    KV cache, activations and the CUDA context (at most every expert); 0 when nothing fits."""
    free = profile.gpu_memory_bytes - resident_bytes - reserve_bytes
    return int(min(num_experts_total, max(0, free // expert_bytes)))


def hardware_profiles() -> dict[str, HardwareProfile]:
    """Every profile shipped in `hardware/`, by name."""
    profiles = [HardwareProfile.from_json(path) for path in sorted(PROFILE_DIR.glob("*.json"))]
    return {p.name: p for p in profiles}


def hardware_profile(name_or_path: str) -> HardwareProfile:
    """A shipped profile by name, or a profile file by path."""
    if Path(name_or_path).suffix == ".json" and Path(name_or_path).exists():
        return HardwareProfile.from_json(name_or_path)
    profiles = hardware_profiles()
    if name_or_path not in profiles:
        raise KeyError(f"no hardware profile {name_or_path!r}; shipped: {', '.join(profiles)} (or a .json path)")
    return profiles[name_or_path]


@dataclass(frozen=True)
class SimulatedModel:
    """What the simulator needs of a model: its MoE layers' experts and the rest of each layer."""

    name: str
    num_experts: int  # E
    top_k: int  # K
    expert_bytes: int  # one expert's weights as stored (bf16, or quantized)
    expert_flop_per_token: int
    dense_bytes_per_layer: int  # the non-expert weights of one MoE layer (attention, router, shared experts)
    dense_flop_per_token_per_layer: int

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"model {self.name!r}: {f.name} must be an int >= 0, got {value!r}")
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts or self.expert_bytes < 1:
            raise ValueError(f"model {self.name!r}: needs E >= 1, 1 <= K <= E and expert_bytes >= 1")


def dense_seconds(profile: HardwareProfile, model: SimulatedModel, tokens: int) -> float:
    """One layer's non-expert part on the GPU for `tokens` tokens (a few kernels: attention's and the router's)."""
    return (max(model.dense_bytes_per_layer / profile.gpu_bytes_per_s,
                tokens * model.dense_flop_per_token_per_layer / profile.gpu_flop_per_s) + 4 * profile.gpu_kernel_s)


@dataclass(frozen=True)
class LayerTime:
    """One layer step's expert phase, from the moment its plan is made (the host's work done): the CPU experts'
    seconds (sum of t_cpu, the call's fixed part once), and the seconds until the GPU's last expert of the step
    finished (copies waited for included; 0 without GPU experts). The step's expert phase lasts the longer of
    the two."""

    cpu_s: float
    gpu_s: float


@dataclass
class SimulatedRun:
    """A policy's simulated run: its time, where the time went, and the replay's counters."""

    policy: str
    tokens: int  # tokens processed (S * B)
    seconds: float
    cpu_busy_s: float = 0.0  # CPU experts
    gpu_busy_s: float = 0.0  # GPU experts and the non-expert part
    pcie_busy_s: float = 0.0  # every copy: staging, admissions, background, prefetch
    host_s: float = 0.0  # the host's per-layer work (nothing else runs on the critical path meanwhile)
    prefetches: int = 0
    prefetch_hits: int = 0
    replay: PolicyReplay | None = None
    layer_times: list[LayerTime] = field(default_factory=list)  # per layer step, in the replay's order

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def idle_s(self) -> float:
        """Time when neither the CPU nor the GPU computed and the host was not working either (waiting on
        copies): a lower bound, as CPU and GPU busy times may overlap."""
        return max(0.0, self.seconds - max(self.cpu_busy_s, self.gpu_busy_s) - self.host_s)


@dataclass
class _Clock:
    now: float = 0.0  # when the current layer may start
    gpu_free: float = 0.0
    copy_free: float = 0.0
    prefetch_ready: dict = field(default_factory=dict)  # expert -> when its prefetch copy lands (this layer)
    landed: dict = field(default_factory=dict)  # (layer, expert) -> when its background copy lands


class _Timer:
    """Prices each checked decision of a replay in order (replay_policy's `observe`)."""

    def __init__(self, profile: HardwareProfile, model: SimulatedModel, cost: CostModel, tokens_per_step: int,
                 run: SimulatedRun, prefetch: Prediction | None, prefetch_count: int, timing: CostModel):
        self.profile, self.cost, self.run, self.prefetch = profile, cost, run, prefetch
        self.timing = timing  # what experts and copies take; `cost` is what the decisions see
        self.prefetch_count = prefetch_count
        self.dense_s = dense_seconds(profile, model, tokens_per_step)
        self.clock = _Clock()
        self.pending = np.zeros(0, dtype=np.int64)  # prefetch asked for the next layer, not yet scheduled

    def prefetch_for(self, s: int, layer: int, resident: np.ndarray) -> np.ndarray:
        """replay_policy's `prefetch`: what the runtime copies ahead for (s, layer) from the predicted workload
        (`prefetch.prefetch_choice`), during the previous layer's step (scheduled by its __call__, next)."""
        counts, mass = self.prefetch(s, layer)
        self.pending = prefetch_choice(np.asarray(counts), np.asarray(mass, dtype=np.float64), resident, self.cost,
                                       self.prefetch_count)
        return self.pending

    def __call__(self, step: LayerStep, decision: Decision) -> None:
        c, run, transfer = self.clock, self.run, self.timing.transfer_seconds
        gpu_start = max(c.now, c.gpu_free)
        c.gpu_free = gpu_start + self.dense_s
        run.gpu_busy_s += self.dense_s
        prefetched_at = c.prefetch_ready
        self._issue_prefetch(c.gpu_free)  # the step's first action, with the gate input in hand
        ready = c.gpu_free + self.profile.host_layer_s  # the routing is on the host and the plan made
        run.host_s += self.profile.host_layer_s
        on_gpu = np.asarray(decision.on_gpu).tolist()
        cached, experts = step.cached.tolist(), step.experts.tolist()
        # each expert's t_cpu(w) and t_gpu(w) from the cost model's table (as resident: copies are timed apart)
        t_cpu, t_gpu, _ = _tabulated_costs(step.workloads, np.ones(len(experts), dtype=bool), self.timing)
        t_cpu, t_gpu = t_cpu.tolist(), t_gpu.tolist()
        on_cpu = [c for c, g in zip(t_cpu, on_gpu, strict=True) if not g]
        # one CPU-experts call per layer step: its fixed part once, not once per expert
        cpu_s = sum(on_cpu) - self.timing.cpu_call_seconds * (len(on_cpu) - 1) if on_cpu else 0.0
        run.cpu_busy_s += cpu_s
        gpu_t = max(ready, c.gpu_free)
        copied = []
        for e, g_s, g, hit in zip(experts, t_gpu, on_gpu, cached, strict=True):
            if g and hit:  # resident: cached or prefetched, computed once its copy has landed
                landed = prefetched_at.get(e, c.landed.get((step.layer, e), 0.0))
                gpu_t = max(gpu_t, landed) + g_s
            elif g:
                copied.append(g_s)
        admitted = len(decision.admit)
        copy_t = max(ready, c.copy_free)
        slot_free = [0.0] * max(1, step.staging_slots)  # when staging slot j's previous expert was computed
        for i, g_s in enumerate(copied):
            j = (i - admitted) % len(slot_free)
            if i >= admitted:  # staged: the slot is reused once its previous expert was computed
                copy_t = max(copy_t, slot_free[j])
            copy_t += transfer
            gpu_t = max(gpu_t, copy_t) + g_s
            if i >= admitted:
                slot_free[j] = gpu_t
        run.gpu_busy_s += sum(g_s for g_s, g in zip(t_gpu, on_gpu, strict=True) if g)
        run.pcie_busy_s += (len(copied) + len(decision.background)) * transfer
        # background copies start after this step's GPU work (they may overwrite a slot it read); a later
        # step computes such an expert once its copy has landed
        c.copy_free = max(copy_t, gpu_t) if decision.background else copy_t
        for expert, _ in decision.background:
            c.copy_free += transfer
            c.landed[(step.layer, int(expert))] = c.copy_free
        c.gpu_free = gpu_t
        c.now = max(ready + cpu_s, gpu_t)
        run.layer_times.append(LayerTime(cpu_s, gpu_t - ready))

    def _issue_prefetch(self, issued: float) -> None:
        """The pending prefetch (for the next layer's step) on the copy stream from `issued` on."""
        c, transfer = self.clock, self.timing.transfer_seconds
        c.prefetch_ready = {}
        for expert in self.pending.tolist():
            c.copy_free = max(c.copy_free, issued) + transfer
            c.prefetch_ready[expert] = c.copy_free
            self.run.pcie_busy_s += transfer
        self.pending = self.pending[:0]


def simulate(
    policy: Policy,
    counts: np.ndarray,
    profile: HardwareProfile,
    model: SimulatedModel,
    *,
    budget_slots: int,
    tokens_per_step: int,
    prefetch: Prediction | None = None,
    prefetch_count: int = 0,
    cost: CostModel | None = None,
    timing_cost: CostModel | None = None,
) -> SimulatedRun:
    """Simulate `policy` over routing counts int [S, L, E] (B = `tokens_per_step` tokens per step) with a
    budget of `budget_slots` expert slots on `profile`. `prefetch(step, layer)`, when given, is the predicted
    workload of that layer's step (tokens per expert [E], routing weight per expert [E]; layers >= 1), from
    which up to `prefetch_count` (P) experts are copied ahead as the runtime chooses them
    (`prefetch.prefetch_choice`) while the previous layer runs; their 2P slots come out of the budget, as in
    the runtime. `cost`: the cost model the policies see and the experts are timed with, e.g. the one a runtime
    profiled (`HybridRuntime.cost`); default: the profile's roofline (`HardwareProfile.cost_model`).
    `timing_cost`, when given, times the experts and copies instead of `cost` (which the decisions still see):
    the same decisions on other hardware, or priced by a fresher measurement. Returns the run's time, busy
    times, per layer step times and counters."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 3 or counts.shape[2] != model.num_experts:
        raise ValueError(f"routing counts must be [S, L, {model.num_experts}] for {model.name}, got {counts.shape}")
    if isinstance(tokens_per_step, bool) or not isinstance(tokens_per_step, (int, np.integer)) or tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be an int >= 1, got {tokens_per_step!r}")
    if prefetch is not None and (isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int)
                                 or not 1 <= prefetch_count <= model.num_experts):
        raise ValueError(f"prefetch_count must be an int in 1..{model.num_experts} with a prefetch, "
                         f"got {prefetch_count!r}")
    if prefetch is not None:
        budget_slots -= 2 * prefetch_count
        if budget_slots < 0:
            raise ValueError(f"a budget of {budget_slots + 2 * prefetch_count} slots cannot hold the 2P = "
                             f"{2 * prefetch_count} prefetch slots")
    if cost is None:
        cost = profile.cost_model(model.expert_bytes, model.expert_flop_per_token)
    run = SimulatedRun(policy.name, int(counts.shape[0]) * int(tokens_per_step), 0.0)
    timing = cost if timing_cost is None else timing_cost
    timer = _Timer(profile, model, cost, int(tokens_per_step), run, prefetch, prefetch_count, timing)
    run.replay = replay_policy(policy, counts, budget_slots=budget_slots, top_k=model.top_k, cost=cost,
                               observe=timer, prefetch=None if prefetch is None else timer.prefetch_for)
    run.seconds = timer.clock.now
    run.prefetches, run.prefetch_hits = run.replay.prefetches, run.replay.prefetch_hits
    return run

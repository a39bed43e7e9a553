"""Replay real routing traces through the runtime's policies: cache hit rate against Belady's MIN at an equal
copy budget, bytes copied, and the greedy plans against the exact optimum. No model, no device.

# E experts, K top-k, L MoE layers, B tokens per step, c cache slots per layer

    python benchmarks/replay_traces.py                      # table, replay_traces.csv, replay_traces.png
    python benchmarks/replay_traces.py --batches 1 8 --exact-every 4
    python benchmarks/replay_traces.py --windows 1 2 8       # workload vs lru= / lfu= at other copy budgets
    python benchmarks/replay_traces.py --traces-dir /elsewhere/traces

Traces (../shared/traces, see its README.md; never copied into the project): Mixtral-8x7B-Instruct decode
(E = 8, K = 2, L = 32; the four prompts' decode tokens one after another, the caches carried over as a
server would) and FLAME-MoE-290M's 2048-token stream (E = 64, K = 6, L = 8). Steps of B consecutive tokens
(B = 1: decode); trace rows without routing are skipped. Each layer's cache holds 25% and 50% of its
experts, initially the first ones; K staging slots (the runtime's default split).

Rows, all `DaliPolicy` (greedy CPU/GPU plans) with another cache replacement, then two runtime baselines:
  static         the initial cache for good (no copies)
  workload       DALI's workload-aware replacement, (w_size, u_size) by E: (4, 1) Mixtral, (4, 8) FLAME
  lru, lfu       copy every miss after its step
  lru=, lfu=     the same with a copy quota per step matched to workload's measured copies (calibrated until
                 their own copies per step are within 1%): the comparison at an equal copy budget
  belady         Belady's MIN (offline, copies every useful miss): the ceiling of the hit rate of replacement
                 on demand (a window's swaps may bring in an expert a few steps after its use, so in principle
                 a row could top it; one above 100% shows as such)
  rt:lru         LruPolicy (mixtral-offloading): every expert on the GPU, misses copied into the cache
  rt:cache_cpu   CacheCpuMissPolicy (2512.16473): misses on the CPU, 1 copied per step; the whole budget is
                 cache, so its budget here is L * c
  --windows      more rows: workload(w, u) for each extra w_size, with its own lru=@w and lfu=@w

Targets (printed after the table): on Mixtral at 25% and 50%, workload's hit rate above lru='s.

Columns: hit rate (active experts resident at their step's start) and its fraction of Belady's; copies into
the cache per layer step (the replacement's budget); every copy (staging included) per token over all
layers and in MB per token (bf16 experts: Mixtral 352 MB; FLAME about 4.4 MB, estimated from its published
1.3B total / 290M active parameters: (1.3e9 - 0.29e9) / (8 layers * 58 inactive experts) parameters);
plan quality (exact/greedy makespan, mean over steps, and the share of steps where greedy is optimal) and
the predicted MoE time per token under the cost model (sum over layers of each step's planned makespan).

Cost model: bench_planner's roofline from the RTX 4090 Mixtral numbers (0.25 ms GPU, 28 ms copy, 7.3 ms CPU
at one token; see its docstring), for both traces (every time scales with the expert's size alike, so plan
quality does not depend on it; the ms/token of FLAME are those of Mixtral-sized experts). `--cost-json`
replaces it. Exact plans: scipy's MILP (`planner.exact_plan`), each distinct problem solved once;
`--exact-every N` checks every N-th layer step only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from bench_planner import (
    FLAME_TRACE,
    MIXTRAL,
    MIXTRAL_DECODE_STREAMS,
    MIXTRAL_TRACE,
    TRACES,
    load_cost_json,
    roofline_cost_model,
    write_csv,
)

from dali_compile.runtime.cache_replacement import Belady, Lfu, Lru, WorkloadAware, default_window
from dali_compile.runtime.planner import CostModel, exact_plan
from dali_compile.runtime.policies import CacheCpuMissPolicy, DaliPolicy, LruPolicy
from dali_compile.runtime.replay import (
    PolicyReplay,
    counts_from_trace,
    decision_makespan,
    replay_cache,
    replay_policy,
)

FLAME_EXPERT_BYTES = round((1.3e9 - 0.29e9) / (8 * (64 - 6))) * 2  # an estimate: see the module docstring


@dataclass(frozen=True)
class Trace:
    name: str
    ids: np.ndarray  # int [T, L, K], negative: missing
    num_experts: int  # E
    top_k: int  # K
    expert_bytes: int


@dataclass(frozen=True)
class Row:
    trace: str
    batch: int
    cache: str  # "25% (2)": fraction of E and slots per layer
    policy: str
    hit_rate: float
    of_belady: float
    cache_copies_per_step: float  # copies into the cache per layer step
    copies_per_token: float  # every copy (staging included), all layers
    mb_per_token: float
    quota: float | None  # lru= / lfu=: the copy quota per step
    plan_quality: float | None  # mean exact/greedy makespan (dali rows)
    greedy_optimal: float | None  # share of checked steps where greedy is optimal
    ms_per_token: float  # predicted MoE time per token (cost model)


def load_traces(args) -> list[Trace]:
    traces = []
    for name, path in (("mixtral-8x7b", args.mixtral_trace), ("flame-moe-290m", args.flame_trace)):
        if not os.path.exists(path):
            sys.exit(
                f"replay_traces: trace {path} not found. The traces live in ../shared/traces next to the repository "
                f"(see its README.md); pass --traces-dir, --mixtral-trace or --flame-trace."
            )
        data = np.load(path)
        if name == "mixtral-8x7b":
            ids = np.concatenate([data[f"{s}_decode_expert_ids"] for s in MIXTRAL_DECODE_STREAMS])
            traces.append(Trace(name, ids, 8, 2, MIXTRAL.bytes))
        else:
            traces.append(Trace(name, data["stream_expert_ids"], 64, 6, FLAME_EXPERT_BYTES))
    return traces


def cache_rate(run: PolicyReplay) -> float:
    return run.cache_copies / max(run.layer_steps, 1)


def matched_quota(cls, counts: np.ndarray, capacity: int, target: float, rounds: int = 8) -> float:
    """A quota for `cls` (Lru or Lfu) whose own copies per layer step come closest to `target` (within 1% stops
    the search). A copy-on-miss policy cannot always spend its quota (no miss, or no idle victim), and its copies
    grow in steps with the quota, so the quota is scaled up until it overshoots, then bisected."""
    if target == 0:
        return 0.0
    low, high, quota = 0.0, None, target
    best = (math.inf, quota)  # (|copies - target|, quota)
    for _ in range(rounds):
        copies = cache_rate(replay_cache(cls(quota), counts, capacity=capacity))
        best = min(best, (abs(copies - target), quota))
        if abs(copies - target) <= 0.01 * target:
            break
        if copies > target:
            high = quota
        else:
            low = quota
        if high is not None:
            quota = (low + high) / 2
        else:
            quota = quota * target / copies if copies > 0 else quota * 2
    return best[1]


class PlanQuality:
    """Observes a replay: each checked step's decision makespan against the exact optimum (memoised by problem)."""

    def __init__(self, cost: CostModel, every: int, memo: dict):
        self.cost, self.every, self.memo = cost, every, memo
        self.seen = 0
        self.ratios: list[float] = []

    def __call__(self, step, decision) -> None:
        self.seen += 1
        if (self.seen - 1) % self.every:
            return
        key = (tuple(sorted(zip(step.workloads.tolist(), step.cached.tolist(), strict=True))), step.staging_slots)
        if key not in self.memo:
            plan = exact_plan(step.experts, step.workloads, step.cached, self.cost, step.staging_slots)
            self.memo[key] = plan.makespan
        greedy = decision_makespan(step, decision.on_gpu, self.cost)
        self.ratios.append(min(self.memo[key] / greedy, 1.0) if greedy > 0 else 1.0)

    def mean(self) -> float | None:
        return float(np.mean(self.ratios)) if self.ratios else None

    def optimal(self) -> float | None:
        return float(np.mean(np.asarray(self.ratios) >= 1 - 1e-9)) if self.ratios else None


def replay_config(trace: Trace, batch: int, fraction: float, cost: CostModel, args, memo: dict) -> list[Row]:
    counts = counts_from_trace(trace.ids, trace.num_experts, batch)
    steps, layers, E = counts.shape
    tokens = steps * batch
    capacity = round(fraction * E)
    label = f"{fraction:.0%} ({capacity})"
    w0, u0 = default_window(E)
    windowed = []  # per window: workload and its quota-matched lru= and lfu=; the default window first, untagged
    for w in [w0] + [w for w in args.windows if w != w0]:
        tag = "" if w == w0 else f"@w{w}"
        rate = cache_rate(replay_cache(WorkloadAware(w, u0), counts, capacity=capacity))
        quotas = {cls: matched_quota(cls, counts, capacity, rate) for cls in (Lru, Lfu)}
        windowed += [
            (f"workload({w},{u0})", DaliPolicy(cache="workload", w_size=w, u_size=u0), None),
            (f"lru={tag}", DaliPolicy(cache=Lru(quotas[Lru])), quotas[Lru]),
            (f"lfu={tag}", DaliPolicy(cache=Lfu(quotas[Lfu])), quotas[Lfu]),
        ]
    runs = [
        ("static", DaliPolicy(cache="static"), None),
        *windowed[:3],
        ("lru", DaliPolicy(cache="lru"), None),
        ("lfu", DaliPolicy(cache="lfu"), None),
        ("belady", DaliPolicy(cache=Belady.from_counts(counts)), None),
        ("rt:lru", LruPolicy(), None),
        ("rt:cache_cpu", CacheCpuMissPolicy(quota=1), None),
        *windowed[3:],
    ]
    results = []
    for name, policy, quota in runs:
        budget = layers * capacity + (0 if isinstance(policy, CacheCpuMissPolicy) else trace.top_k)
        quality = PlanQuality(cost, args.exact_every, memo) if isinstance(policy, DaliPolicy) else None
        run = replay_policy(policy, counts, budget_slots=budget, top_k=trace.top_k, cost=cost, observe=quality)
        if run.plan.cache_slots != (capacity,) * layers:
            raise RuntimeError(f"{name}: planned {run.plan.cache_slots} cache slots, expected {capacity} per layer")
        results.append((name, run, quota, quality))
    belady = next(run for name, run, _, _ in results if name == "belady").hit_rate
    return [
        Row(
            trace.name,
            batch,
            label,
            name,
            hit_rate=run.hit_rate,
            of_belady=run.hit_rate / belady if belady else float("nan"),
            cache_copies_per_step=cache_rate(run),
            copies_per_token=run.copies / tokens,
            mb_per_token=run.copies * trace.expert_bytes / tokens / 1e6,
            quota=quota,
            plan_quality=quality.mean() if quality else None,
            greedy_optimal=quality.optimal() if quality else None,
            ms_per_token=run.makespan_s / tokens * 1e3,
        )
        for name, run, quota, quality in results
    ]


def print_rows(rows: list[Row]) -> None:
    print(
        f"{'trace':<15} {'B':>2} {'cache':<9} {'policy':<14} {'hit':>6} {'/belady':>7} {'cache cp/step':>13} "
        f"{'cp/token':>8} {'MB/token':>9} {'quota':>6} {'exact/greedy':>12} {'optimal':>7} {'ms/token':>8}"
    )
    for r in rows:
        quota = f"{r.quota:.3f}" if r.quota is not None else "-"
        quality = f"{r.plan_quality:.4f}" if r.plan_quality is not None else "-"
        optimal = f"{r.greedy_optimal:.1%}" if r.greedy_optimal is not None else "-"
        print(
            f"{r.trace:<15} {r.batch:>2} {r.cache:<9} {r.policy:<14} {r.hit_rate:>6.3f} {r.of_belady:>7.1%} "
            f"{r.cache_copies_per_step:>13.3f} {r.copies_per_token:>8.2f} {r.mb_per_token:>9.1f} {quota:>6} "
            f"{quality:>12} {optimal:>7} {r.ms_per_token:>8.1f}"
        )


def check_targets(rows: list[Row]) -> None:
    """The issue's targets: on Mixtral at 25% and 50%, workload's hit rate above quota-matched LRU's."""
    for (trace, batch, cache), group in _groups(rows).items():
        if not trace.startswith("mixtral"):
            continue
        by = {r.policy: r for r in group}
        wa = next(r for r in group if r.policy.startswith("workload("))  # the default window's comes first
        lru = by["lru="]
        verdict = "met" if wa.hit_rate > lru.hit_rate else "MISSED"
        print(
            f"target {trace} B={batch} cache {cache}: workload {wa.hit_rate:.4f} at {wa.cache_copies_per_step:.3f} "
            f"copies/step vs quota-matched LRU {lru.hit_rate:.4f} at {lru.cache_copies_per_step:.3f}: {verdict} "
            f"(Belady {by['belady'].hit_rate:.4f}, unlimited LRU {by['lru'].hit_rate:.4f} at "
            f"{by['lru'].cache_copies_per_step:.3f})"
        )


def _groups(rows: list[Row]) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.trace, r.batch, r.cache), []).append(r)
    return groups


def plot(rows: list[Row], path: str) -> None:
    """Hit rate against copies into the cache per step, one panel per trace, batch and cache size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); `pip install matplotlib` to get one")
        return
    groups = _groups(rows)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, ((trace, batch, cache), group) in zip(axes[0], groups.items(), strict=True):
        for r in group:
            if r.policy == "belady":
                ax.axhline(r.hit_rate, color="gray", linestyle="--", label=f"belady ({r.cache_copies_per_step:.2f})")
            else:
                ax.scatter(r.cache_copies_per_step, r.hit_rate, label=r.policy)
        ax.set_title(f"{trace} B={batch} cache {cache}", fontsize=9)
        ax.set_xlabel("copies into the cache per layer step")
        ax.set_ylabel("hit rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv=None):
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--traces-dir", default=TRACES, help="where both traces are (default: %(default)s)")
    parser.add_argument("--mixtral-trace", help=f"default: TRACES_DIR/{MIXTRAL_TRACE}")
    parser.add_argument("--flame-trace", help=f"default: TRACES_DIR/{FLAME_TRACE}")
    parser.add_argument("--batches", nargs="+", type=int, default=[1], help="tokens per replayed step")
    parser.add_argument("--cache-fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument(
        "--windows",
        nargs="+",
        type=int,
        default=[],
        help="more w_size values for workload (u_size as default), "
        "each with its own quota-matched lru= and lfu= rows: the comparison at other copy budgets",
    )
    parser.add_argument(
        "--exact-every", type=int, default=1, help="check greedy against the exact plan every N-th step"
    )
    parser.add_argument("--cost-json", help="a profiled CostModel (JSON, seconds) instead of the roofline model")
    parser.add_argument("--csv", default="replay_traces.csv")
    parser.add_argument("--plot", default="replay_traces.png")
    args = parser.parse_args(argv)
    if args.exact_every < 1:
        parser.error("--exact-every must be >= 1")
    args.mixtral_trace = args.mixtral_trace or os.path.join(args.traces_dir, MIXTRAL_TRACE)
    args.flame_trace = args.flame_trace or os.path.join(args.traces_dir, FLAME_TRACE)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    traces = load_traces(args)
    cost = load_cost_json(args.cost_json) if args.cost_json else roofline_cost_model(MIXTRAL)
    print(f"cost model: {args.cost_json or 'roofline from the RTX 4090 Mixtral numbers (see --help)'}")
    rows, memo = [], {}
    for trace in traces:
        for batch in args.batches:
            for fraction in args.cache_fractions:
                start = time.perf_counter()
                rows += replay_config(trace, batch, fraction, cost, args, memo)
                print(f"replayed {trace.name} B={batch} cache {fraction:.0%} in {time.perf_counter() - start:.1f} s")
    print_rows(rows)
    check_targets(rows)
    write_csv(args.csv, rows)
    plot(rows, args.plot)


if __name__ == "__main__":
    main()

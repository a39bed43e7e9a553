"""Benchmark: the DALI planner's cost per call, and how close its plans come to the optimum on real routing.

# E experts, K top-k, B tokens per step, n active experts in one layer's step, w workload (tokens per expert)

    python benchmarks/bench_planner.py                       # both parts; CSVs bench_planner_{overhead,quality}.csv
    python benchmarks/bench_planner.py --part overhead --repeats 100
    python benchmarks/bench_planner.py --part quality --batches 1 8 --cache popular

Cost model (both parts): RTX 4090 + 24-core Threadripper, the numbers measured on one Mixtral-8x7B expert
(arXiv 2512.16473, DESIGN.md section 5): 0.25 ms on the GPU, 28 ms to copy over PCIe, 7.3 ms on the CPU (24
threads), all at one token. They set the bandwidths that an expert's bf16 weights (3 H I * 2 bytes) are
read or copied at; with more tokens, compute takes over where it is slower (a roofline), at assumed
effective rates of 1 TFLOP/s on the CPU and 80 TFLOP/s on the GPU, 6 H I FLOP per token:

    t_cpu(w) = max(bytes / cpu_bw, w * flop / 1e12)     Mixtral: max(7.3 ms, w * 0.35 ms), linear from w = 21
    t_gpu(w) = max(bytes / gpu_bw, w * flop / 80e12)    Mixtral: max(0.25 ms, w * 0.0044 ms), linear from w = 57
    transfer = bytes / pcie_bw                          Mixtral: 28 ms

profiled at w = 1, 2, 4, ..., 4096 and interpolated between, as a warm-up profile would be. Every time
scales with the expert's size alike, so plan quality does not depend on it; overhead is compared with the
layer times of the model each E stands for. `--cost-json` replaces the model with a profiled one (a JSON
object with CostModel's fields, in seconds), for every E and both traces.

Part 1, overhead: per E in {8, 64, 128} (Mixtral-8x7B K=2, DeepSeek-V2-Lite K=6, Qwen3-30B-A3B K=8 shapes)
and B in {1, 8, 64}: --problems steps of random top-K routing (each token picks K distinct experts
uniformly), the first E/2 experts cached, K staging slots. Per-call time is the median over --repeats
rounds (after one warm-up round) of a round's time over its steps; the layer time is the median predicted
MoE-layer makespan of the greedy plans, and their ratio is the overhead (target: under 2%; attention and
the rest of the layer would only lower it). The same ratio against the fastest steps (10th percentile of
the makespan, e.g. every active expert cached) is printed beside it.

Part 2, quality: replays the decode routing of Mixtral-8x7B-Instruct (four prompts, 32 layers, top-2 of
8) and FLAME-MoE-290M's 2048-token stream (8 layers, top-6 of 64) in steps of B consecutive tokens (full
steps only; the few whose routing rows are all missing are skipped), each layer with a static cache of
25% and 50% of its experts (--cache popular: the layer's most routed experts over the whole trace, an
oracle static placement; first: experts 0, 1, ...), K staging slots. Per step: greedy's makespan against
the exact optimum (`exact_plan`, a MILP), reported as exact/greedy (1 = optimal; mean and worst) and the
fraction of steps where greedy is optimal, and each planner's time per step. Identical problems (same
workloads and cached flags) are solved exactly once and their time reused: the exact time is per distinct
problem, weighted by how often it occurs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from model_shapes import ModelShape, model_shape

from dali_compile.runtime.planner import CostModel, Plan, exact_plan, greedy_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(REPO, "..", "shared", "traces")
MIXTRAL_TRACE = "mixtral_8x7b_instruct_fp8_vllm_routing.npz"
FLAME_TRACE = "flame_moe_290m_routing.npz"
MIXTRAL_DECODE_STREAMS = ("humaneval_p0", "humaneval_p1", "gsm8k_p0", "gsm8k_p1")


MIXTRAL = model_shape("mixtral-8x7b")
SHAPES = (MIXTRAL, model_shape("deepseek-v2-lite"), model_shape("qwen3-30b-a3b"))

# RTX 4090 + 24-core Threadripper, from one Mixtral expert (arXiv 2512.16473); FLOP rates are assumptions.
CPU_BYTES_PER_S = MIXTRAL.bytes / 7.3e-3
GPU_BYTES_PER_S = MIXTRAL.bytes / 0.25e-3
PCIE_BYTES_PER_S = MIXTRAL.bytes / 28e-3
CPU_FLOP_PER_S = 1.0e12
GPU_FLOP_PER_S = 80e12
PROFILED_WORKLOADS = tuple(2**i for i in range(13))  # 1 .. 4096


def roofline_cost_model(shape: ModelShape) -> CostModel:
    """The module docstring's cost model for one expert of `shape`, in seconds."""
    w = np.asarray(PROFILED_WORKLOADS, dtype=np.float64)
    cpu = np.maximum(shape.bytes / CPU_BYTES_PER_S, w * shape.flop_per_token / CPU_FLOP_PER_S)
    gpu = np.maximum(shape.bytes / GPU_BYTES_PER_S, w * shape.flop_per_token / GPU_FLOP_PER_S)
    return CostModel(PROFILED_WORKLOADS, tuple(cpu.tolist()), tuple(gpu.tolist()), shape.bytes / PCIE_BYTES_PER_S)


def load_cost_json(path: str) -> CostModel:
    with open(path) as f:
        fields = json.load(f)
    return CostModel(tuple(fields["workloads"]), tuple(fields["cpu_seconds"]), tuple(fields["gpu_seconds"]),
                     float(fields["transfer_seconds"]))


Problem = tuple  # (experts int64 [n], workloads int64 [n], cached bool [n], cost, staging slots): greedy_plan's args


def step_problem(expert_ids: np.ndarray, cached_set: np.ndarray, cost: CostModel, slots: int) -> Problem:
    """One layer's step from the expert ids its tokens were routed to (any shape; negative ids = missing)."""
    ids = expert_ids[expert_ids >= 0].astype(np.int64)
    experts, workloads = np.unique(ids, return_counts=True)
    return experts, workloads.astype(np.int64), cached_set[experts], cost, slots


# ---------------------------------------------------------------------------------------------- overhead


@dataclass(frozen=True)
class OverheadResult:
    model: str
    experts: int
    top_k: int
    batch: int
    mean_active: float
    greedy_us: float  # median per call
    greedy_us_min_round: float
    layer_ms: float  # median predicted MoE-layer makespan
    overhead_fraction: float  # greedy_us / layer_ms
    layer_ms_p10: float  # the fastest steps' makespan (10th percentile: e.g. every active expert cached)
    overhead_fraction_p10: float  # greedy_us / layer_ms_p10


def random_problems(shape: ModelShape, batch: int, count: int, cost: CostModel, rng) -> list[Problem]:
    cached_set = np.arange(shape.experts) < shape.experts // 2
    problems = []
    for _ in range(count):
        ids = np.argsort(rng.random((batch, shape.experts)), axis=1)[:, :shape.top_k]
        problems.append(step_problem(ids, cached_set, cost, shape.top_k))
    return problems


def time_rounds_us(problems: list[Problem], repeats: int) -> list[float]:
    """Per-call microseconds of greedy_plan, one value per round over all problems (after a warm-up round)."""
    rounds = []
    for r in range(repeats + 1):
        start = time.perf_counter_ns()
        for p in problems:
            greedy_plan(*p)
        if r:
            rounds.append((time.perf_counter_ns() - start) / 1e3 / len(problems))
    return rounds


def bench_overhead(args, custom_cost: CostModel | None) -> list[OverheadResult]:
    rng = np.random.default_rng(args.seed)
    results = []
    for shape in SHAPES:
        cost = custom_cost or roofline_cost_model(shape)
        for batch in args.overhead_batches:
            problems = random_problems(shape, batch, args.problems, cost, rng)
            rounds = time_rounds_us(problems, args.repeats)
            makespans = [greedy_plan(*p).makespan for p in problems]
            layer_s, fast_layer_s = float(np.median(makespans)), float(np.percentile(makespans, 10))
            per_call = statistics.median(rounds)
            results.append(OverheadResult(shape.name, shape.experts, shape.top_k, batch,
                                          float(np.mean([len(p[0]) for p in problems])), per_call, min(rounds),
                                          layer_s * 1e3, per_call * 1e-6 / layer_s,
                                          fast_layer_s * 1e3, per_call * 1e-6 / fast_layer_s))
    return results


def print_overhead(results: list[OverheadResult]) -> None:
    print(f"{'model':<18} {'E':>4} {'K':>2} {'B':>3} {'n':>6} {'greedy us':>10} {'(best)':>7} {'layer ms':>9} "
          f"{'overhead':>9} {'p10 layer ms':>13} {'overhead':>9}")
    for r in results:
        flag = "" if r.overhead_fraction < 0.02 else "  median step > 2%"
        print(f"{r.model:<18} {r.experts:>4} {r.top_k:>2} {r.batch:>3} {r.mean_active:>6.1f} {r.greedy_us:>10.1f} "
              f"{r.greedy_us_min_round:>7.1f} {r.layer_ms:>9.3f} {r.overhead_fraction:>9.2%} "
              f"{r.layer_ms_p10:>13.3f} {r.overhead_fraction_p10:>9.2%}{flag}")


# ----------------------------------------------------------------------------------------------- quality


@dataclass(frozen=True)
class QualityResult:
    trace: str
    batch: int
    cache: str  # "popular 25%" etc.
    steps: int  # (token batch, layer) pairs
    distinct_problems: int
    mean_active: float
    quality_mean: float  # exact makespan / greedy makespan (1 = optimal)
    quality_min: float
    greedy_optimal_fraction: float
    greedy_over_exact_mean: float
    greedy_over_exact_max: float
    layer_ms: float  # median greedy makespan
    greedy_us: float  # median per step
    exact_ms: float  # median per step (each distinct problem timed once)
    exact_over_greedy_time: float
    greedy_time_fraction: float  # greedy_us / layer time (median ratio over steps)
    exact_time_fraction: float


def load_traces(args) -> list[tuple[str, list[np.ndarray], int, int]]:
    """(name, streams of expert ids [T, L, K], E, K) per trace; exits with a message if one is missing."""
    traces = []
    for name, path in (("mixtral-8x7b", args.mixtral_trace), ("flame-moe-290m", args.flame_trace)):
        if not os.path.exists(path):
            sys.exit(f"bench_planner: trace {path} not found. The traces live in ../shared/traces next to the "
                     f"repository (see its README.md); pass --traces-dir or --{name.split('-')[0]}-trace.")
        data = np.load(path)
        if name == "mixtral-8x7b":
            streams = [data[f"{s}_decode_expert_ids"] for s in MIXTRAL_DECODE_STREAMS]
            traces.append((name, streams, 8, 2))
        else:
            traces.append((name, [data["stream_expert_ids"]], 64, 6))
    return traces


def static_caches(streams: list[np.ndarray], num_experts: int, size: int, policy: str) -> np.ndarray:
    """bool [L, E]: each layer's cached experts (the `size` most routed over the trace, or the first `size`)."""
    layers = streams[0].shape[1]
    cached = np.zeros((layers, num_experts), dtype=bool)
    for layer in range(layers):
        if policy == "first":
            cached[layer, :size] = True
            continue
        ids = np.concatenate([s[:, layer].ravel() for s in streams])
        counts = np.bincount(ids[ids >= 0].astype(np.int64), minlength=num_experts)
        cached[layer, np.argsort(-counts, kind="stable")[:size]] = True
    return cached


def solve_exact(problem: Problem, memo: dict) -> tuple[float, float]:
    """(makespan, solving seconds) of the exact plan, once per distinct (workloads, cached) multiset."""
    _, workloads, cached, cost, slots = problem
    key = tuple(sorted(zip(workloads.tolist(), cached.tolist(), strict=True)))
    if key not in memo:
        start = time.perf_counter()
        plan: Plan = exact_plan(*problem)
        memo[key] = (plan.makespan, time.perf_counter() - start)
    return memo[key]


def replay_problems(streams: list[np.ndarray], batch: int, cached: np.ndarray, cost: CostModel, top_k: int,
                    max_steps: int | None) -> tuple[list[Problem], int]:
    """The layers' steps of every full batch of `batch` consecutive tokens, stream after stream (at most
    `max_steps` of them), and how many steps were skipped for having no routing (missing trace rows)."""
    problems, skipped = [], 0
    for stream in streams:
        for start in range(0, len(stream) - batch + 1, batch):
            for layer in range(stream.shape[1]):
                p = step_problem(stream[start:start + batch, layer], cached[layer], cost, top_k)
                if len(p[0]) == 0:
                    skipped += 1
                elif max_steps is None or len(problems) < max_steps:
                    problems.append(p)
    return problems, skipped


def bench_quality(args, traces, custom_cost: CostModel | None) -> list[QualityResult]:
    cost = custom_cost or roofline_cost_model(MIXTRAL)
    exact_plan(np.arange(2), np.array([1, 1]), np.array([True, False]), cost, 1)  # imports scipy, warms HiGHS
    results = []
    for name, streams, num_experts, top_k in traces:
        for fraction in args.cache_fractions:
            cached = static_caches(streams, num_experts, round(fraction * num_experts), args.cache)
            for batch in args.batches:
                problems, skipped = replay_problems(streams, batch, cached, cost, top_k, args.max_steps)
                if skipped:
                    print(f"{name} B={batch}: {skipped} steps without routing (missing trace rows) skipped")
                greedy, greedy_s = [], []
                for p in problems:  # greedy first, all steps in a row: its timing is not disturbed by HiGHS
                    start = time.perf_counter_ns()
                    greedy.append(greedy_plan(*p).makespan)
                    greedy_s.append((time.perf_counter_ns() - start) * 1e-9)
                memo: dict = {}
                exact, exact_s = zip(*(solve_exact(p, memo) for p in problems), strict=True)
                rows = (greedy, exact, greedy_s, exact_s, [len(p[0]) for p in problems])
                results.append(summarise(name, batch, f"{args.cache} {fraction:.0%}", rows, len(memo)))
    return results


def summarise(trace: str, batch: int, cache: str, rows: tuple, distinct: int) -> QualityResult:
    """rows: per step, greedy makespan, exact makespan, greedy seconds, exact seconds, active experts."""
    greedy, exact, greedy_s, exact_s, active = (np.asarray(c, dtype=np.float64) for c in rows)
    if np.any(exact > greedy * (1 + 1e-9)):
        print(f"warning: {trace} B={batch} {cache}: the exact plan is worse than greedy in "
              f"{int(np.sum(exact > greedy * (1 + 1e-9)))} steps (solver tolerance?)", file=sys.stderr)
    quality = np.minimum(exact / greedy, 1.0)  # above 1 only within the solver's tolerance
    return QualityResult(
        trace, batch, cache, len(greedy), distinct, float(active.mean()),
        quality_mean=float(quality.mean()), quality_min=float(quality.min()),
        greedy_optimal_fraction=float(np.mean(greedy <= exact * (1 + 1e-9))),
        greedy_over_exact_mean=float(np.mean(greedy / exact)), greedy_over_exact_max=float(np.max(greedy / exact)),
        layer_ms=float(np.median(greedy)) * 1e3, greedy_us=float(np.median(greedy_s)) * 1e6,
        exact_ms=float(np.median(exact_s)) * 1e3, exact_over_greedy_time=float(np.median(exact_s / greedy_s)),
        greedy_time_fraction=float(np.median(greedy_s / greedy)),
        exact_time_fraction=float(np.median(exact_s / greedy)))


def print_quality(results: list[QualityResult]) -> None:
    print(f"{'trace':<15} {'B':>3} {'cache':<12} {'steps':>6} {'n':>5} {'exact/greedy':>12} {'(worst)':>8} "
          f"{'optimal':>8} {'layer ms':>9} {'greedy us':>10} {'exact ms':>9} {'greedy %':>9} {'exact %':>8}")
    for r in results:
        print(f"{r.trace:<15} {r.batch:>3} {r.cache:<12} {r.steps:>6} {r.mean_active:>5.1f} {r.quality_mean:>12.4f} "
              f"{r.quality_min:>8.4f} {r.greedy_optimal_fraction:>8.1%} {r.layer_ms:>9.2f} {r.greedy_us:>10.1f} "
              f"{r.exact_ms:>9.2f} {r.greedy_time_fraction:>9.3%} {r.exact_time_fraction:>8.2%}")


# ------------------------------------------------------------------------------------------------- main


def interpreter_us() -> float:
    """A yardstick for the machine's Python speed when timed (shared machines vary a lot): sum(range(1000))."""
    start = time.perf_counter_ns()
    for _ in range(2000):
        sum(range(1000))
    return (time.perf_counter_ns() - start) / 2000 / 1e3


def write_csv(path: str, results: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    print(f"wrote {path}")


def parse_args(argv=None):
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("overhead", "quality", "both"), default="both")
    parser.add_argument("--cost-json", help="a profiled CostModel (JSON, seconds) instead of the roofline model")
    parser.add_argument("--overhead-batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--problems", type=int, default=200, help="random steps per overhead point")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds per overhead point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traces-dir", default=TRACES, help="where both traces are (default: %(default)s)")
    parser.add_argument("--mixtral-trace", help=f"default: TRACES_DIR/{MIXTRAL_TRACE}")
    parser.add_argument("--flame-trace", help=f"default: TRACES_DIR/{FLAME_TRACE}")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32], help="tokens per replayed step")
    parser.add_argument("--cache-fractions", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--max-steps", type=int, help="replay at most this many (token batch, layer) steps per "
                        "point, the first ones (default: all)")
    parser.add_argument("--cache", choices=("popular", "first"), default="popular",
                        help="static cache: each layer's most routed experts over the trace, or the first ones")
    parser.add_argument("--overhead-csv", default="bench_planner_overhead.csv")
    parser.add_argument("--quality-csv", default="bench_planner_quality.csv")
    args = parser.parse_args(argv)
    args.mixtral_trace = args.mixtral_trace or os.path.join(args.traces_dir, MIXTRAL_TRACE)
    args.flame_trace = args.flame_trace or os.path.join(args.traces_dir, FLAME_TRACE)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    custom_cost = load_cost_json(args.cost_json) if args.cost_json else None
    traces = load_traces(args) if args.part in ("quality", "both") else None  # a missing trace fails first
    print(f"cost model: {args.cost_json or 'roofline from the RTX 4090 Mixtral numbers (see --help)'}; "
          f"numpy {np.__version__}, python {sys.version.split()[0]}; sum(range(1000)) takes {interpreter_us():.1f} us")
    if args.part in ("overhead", "both"):
        results = bench_overhead(args, custom_cost)
        print_overhead(results)
        print(f"sum(range(1000)) now takes {interpreter_us():.1f} us")
        write_csv(args.overhead_csv, results)
    if args.part in ("quality", "both"):
        results = bench_quality(args, traces, custom_cost)
        print_quality(results)
        write_csv(args.quality_csv, results)


if __name__ == "__main__":
    main()

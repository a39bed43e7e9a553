"""Validation of the simulator against the runtime: the same routing through the same policy gives the same
counters, and the simulator's CPU expert time is held against the measured one.

# S steps (forward calls), L MoE layers, E experts, K top-k, B batch, P prompt tokens, N decode steps

    python benchmarks/validate_simulator.py --device emulated            # this machine (CPU test double)
    python benchmarks/validate_simulator.py --device cuda --out results  # a CUDA machine: the GPU side too
    python benchmarks/validate_simulator.py --quick                      # tiny sizes: a smoke test

Per model shape, budget and policy: a bench_e2e model (`bench_e2e.build_model`, random weights, its reduced
sizes on the emulated accelerator) is offloaded as bench_e2e offloads it (`dali_compile.offload` with the
budget in bytes, the policy's defaults: the stored profiled cost model, dali's prefetch) and runs a prefill
of [B, P] and N greedy decode steps (`bench_e2e.run_trial`, eager), while
- `recorder.record_routing` records the routing the runtime really saw (each MoE layer's expert ids, and
  for a prefetching policy its gate inputs in fp32), one step per forward call;
- every layer's `LayerStats` is read after each forward call, so each (step, layer) has its own counters
  and times (reading them changes nothing the runtime does).
After the run, the runtime's own predictor predicts each layer's workload from the recorded gate inputs
(the very call the runtime prefetched from, on the same inputs). Then `simulator.simulate` replays the
routing counts [S, L, E] with a fresh instance of the same policy, the same budget in slots (budget bytes //
slot bytes, the 2P prefetch slots taken off as the runtime does), P, those predictions and the runtime's own
cost model (`HybridRuntime.cost`; for a policy that needs none, the one profiled for the same experts).

Counters, which must be EXACTLY equal (any difference prints MISMATCH and the script exits 1): layer steps,
hits, misses, copies (staging, admissions, background and prefetch copies: the runtime's `copies`),
prefetches, prefetch hits, experts and (token, expert) pairs on the CPU and on the GPU; per step, the copies.

CPU time, held to +-20% (flagged, not an error): per layer step, the simulator's CPU expert time (the sum of
t_cpu(w) over its CPU experts) against the measured `cpu_s` (see below), summed per trial; the ratio is the
median over the trials after the first (the warm-up), so that one trial disturbed by another process does not
move it. The decisions always use the runtime's cost model; the simulated times come from three:
- runtime: the runtime's own (the stored warm-up profile, measured once per machine and expert shape, under
  whatever load the machine had then);
- remeasured: that profile measured again just before the runs (`profiling.measure_costs`, not stored): the
  simulator's time model apart from the age of its input;
- profile: the hardware profile's roofline (`--profile`; by default this machine's CPU profile measured in the
  same run: streaming read bandwidth, fp32 GEMM rate and the CPU call's fixed part, `measured_profile`).
`cpu_s` is the CPU experts' call on the step's own thread, after the GPU work was issued (the same op the
profile times, one expert at a time). The 20% applies over the layer steps without a GPU expert ('alone': the
CPU experts by themselves); every layer step with a CPU expert ('all') is shown beside it, where on the
emulated accelerator its copy thread (and, in its async mode, its compute thread) may share the 2 cores.
The profile times calls over one and over 8 experts not in the caches, in interleaved rounds
(`profiling.measure_costs`): t_cpu(w) = f + m(w), a call's fixed part f (dispatch, the threads' start and
join) plus an expert's part in a call of many, and a step's n experts cost sum t_cpu - (n - 1) f. Layers
small enough to stay in the last-level cache (the reduced Mixtral here: 12 MiB a layer) run faster when
nothing else touches memory between their steps (all_cpu) than beside the emulated GPU's reference compute
(layerwise), which no single profile of cold experts fits within 20% both; a real MoE's layers never fit. The
times need an otherwise idle machine: on 2 cores, a call split over both threads waits a
scheduler time slice (~12 ms here, against ~0.1 ms of work at decode) whenever another process holds a core;
the load average is printed before and after the runs (the script adds about 1 itself).

GPU side: on a CUDA machine (`--device cuda`) the same script compares, per layer step with GPU experts and
none on the CPU, the simulator's GPU path (from the plan until the last GPU expert finished: resident
experts, copies on the copy stream, staged experts waiting for their copy; `LayerTime.gpu_s`) with the
measured expert phase (`total_s - plan_s`: the step's wall time after its plan, which ends when the compute
stream has written the output), and the copies' predicted time (copies x the profiled transfer time) with
the measured `copy_wait_s` as a lower bound. On the emulated accelerator the GPU side is printed but means
nothing (copies are memcpy on a worker thread, GPU experts a CPU reference kernel).

Not compared: the simulator's non-expert part and per-layer host work (modelled from a hardware profile,
`--profile`), and the end-to-end time. A step larger than the runtime's chunk (`max_step_tokens`) would copy
its staged experts once per chunk, which the replay does not model: the script refuses such sizes.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_e2e import (  # the sibling script's
    DTYPES,
    FULL,
    REDUCED,
    ModelShape,
    budget_bytes,
    build_model,
    expert_geometry,
    free_memory,
    run_trial,
)

import dali_compile
from dali_compile.offload import runtime_of
from dali_compile.runtime.planner import CostModel
from dali_compile.runtime.policies import POLICIES, make_policy
from dali_compile.runtime.profiling import measure_costs
from dali_compile.runtime.recorder import record_routing
from dali_compile.runtime.replay import counts_from_trace
from dali_compile.runtime.simulator import LayerTime, SimulatedModel, SimulatedRun, hardware_profile, simulate
from dali_compile.runtime.stats import LayerStats, total

CPU_TOLERANCE = 0.2  # the simulator's CPU time within +-20% of the measured
TIMINGS = ("runtime", "remeasured", "profile")  # the cost models the simulated times come from (module docstring)
# The counters compared: LayerStats fields, each against the replay's figure (`compare`).
COUNTERS = ("steps", "hits", "misses", "copies", "prefetches", "prefetch_hits", "experts_cpu", "experts_gpu",
            "tokens_cpu", "tokens_gpu")
# --quick: every dimension small, 16 experts top-4 over 3 MoE layers (so dali prefetches for layers 1 and 2)
QUICK = ModelShape("tiny", "Qwen3MoeConfig", hidden=64, intermediate=32, experts=16, top_k=4, heads=4,
                   kv_heads=2, head_dim=16, vocab=128, layers=3)
GPU_NOTE = ("GPU side: on a CUDA machine, --device cuda compares the simulated GPU path of each GPU-only layer step "
            "(resident experts, copies on the copy stream, staged experts after their copy) with the measured "
            "expert phase (total_s - plan_s), and the copies' time with copy_wait_s")


@dataclass
class Measured:
    """One policy's run through the runtime: what it saw and what it counted."""

    policy: str
    budget: str
    budget_slots: int  # whole expert slots in the budget, prefetch slots included
    prefetch: int  # P
    cost: CostModel | None  # the runtime's own (None for a policy that needs none)
    counts: np.ndarray  # int64 [S, L, E]: tokens per expert of every layer step
    predictions: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None  # (s, l) -> predicted [E], [E]
    layer_stats: list[list[LayerStats]]  # [S][L]: each layer step's own counters and times
    trial_steps: int  # steps (forward calls) per trial; the first trial is the time comparisons' warm-up

    @property
    def total(self) -> LayerStats:
        return total([s for step in self.layer_stats for s in step])


@dataclass
class Comparison:
    """A measured run beside its replay."""

    measured: Measured
    simulated: SimulatedRun  # decided and timed with `cost`
    cost: CostModel  # the runtime's
    counters: list[tuple[str, int, int]] = field(default_factory=list)  # (name, measured, simulated)
    mismatches: list[str] = field(default_factory=list)
    timed: dict[str, tuple[CostModel, SimulatedRun]] = field(default_factory=dict)  # TIMINGS -> the same run timed

    @property
    def equal(self) -> bool:
        return not self.mismatches


# ---------------------------------------------------------------------------------------------------
# The runtime's run


def _delta(after: LayerStats, before: LayerStats) -> LayerStats:
    return LayerStats(**{f.name: getattr(after, f.name) - getattr(before, f.name)
                         for f in dataclasses.fields(LayerStats)})


def _step_counts(arrays: dict, num_experts: int) -> np.ndarray:
    """int64 [S, L, E] from a recording: each forward call is one step."""
    ids = arrays["stream_expert_ids"].astype(np.int64)
    bounds = np.cumsum(arrays["step_tokens"])
    return np.stack([counts_from_trace(ids[end - tokens:end], num_experts, batch=tokens)[0]
                     for tokens, end in zip(arrays["step_tokens"].tolist(), bounds.tolist(), strict=True)])


def _predictions(runtime, arrays: dict) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(s, l) -> the runtime predictor's (tokens per expert [E], routing weight [E]) for layer l's step s, from
    layer l - 1's recorded gate input, as the runtime asked it while running."""
    gates, spec = arrays["stream_gate_inputs"], runtime.layers[0].spec
    predictions, end = {}, 0
    for s, tokens in enumerate(arrays["step_tokens"].tolist()):
        rows = slice(end, end + tokens)
        end += tokens
        for layer in range(1, len(runtime.layers)):
            gate = torch.from_numpy(np.ascontiguousarray(gates[rows, layer - 1]))
            predictions[(s, layer)] = runtime.predictor.predict(layer - 1, gate.to(runtime.accelerator.device,
                                                                                   spec.dtype))
    return predictions


def run_policy(model, policy: str, nbytes: int, prompt: torch.Tensor, steps: int, device: str,
               budget: str = "", trials: int = 2) -> Measured:
    """Offload `model` with `policy` and `nbytes` of expert memory, run `trials` trials (a prefill of `prompt`
    [B, P] into a fresh KV cache and `steps` greedy decode steps; the policy's caches stay warm, as in
    bench_e2e), and return what the runtime saw and counted (the model is released again). The first trial is
    the warm-up of the time comparisons (its counters are compared too)."""
    dali_compile.offload(model, device=device, expert_memory=nbytes, policy=policy)
    try:
        runtime = runtime_of(model)
        if prompt.numel() > runtime.max_step_tokens:
            raise ValueError(f"a prefill of {prompt.numel()} tokens runs in chunks of {runtime.max_step_tokens}, "
                             "which the replay does not model: use a smaller batch or prompt")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        per_step: list[list[LayerStats]] = []

        @functools.wraps(model.forward)  # keeps the signature: run_trial picks the KV cache keyword from it
        def forward(*args, **kwargs):
            before = [dataclasses.replace(layer.stats) for layer in runtime.layers]
            out = model.forward(*args, **kwargs)
            per_step.append([_delta(layer.stats, b) for layer, b in zip(runtime.layers, before, strict=True)])
            return out

        with record_routing(model, gate_inputs=runtime.prefetching, gate_dtype=torch.float32) as recording:
            for _ in range(trials):
                run_trial(forward, prompt, steps, 1, sync, lambda: None)
        arrays = recording.arrays()
        predictions = _predictions(runtime, arrays) if runtime.prefetching else None
        return Measured(policy, budget, nbytes // runtime.slot_bytes, runtime.prefetch if predictions else 0,
                        runtime.cost, _step_counts(arrays, runtime.num_experts), predictions, per_step, 1 + steps)
    finally:
        dali_compile.release(model)
        free_memory(device == "cuda")


def profiled_costs(model, nbytes: int, device: str) -> tuple[CostModel, CostModel]:
    """(the cost model the runtime profiles or reads back for this model's experts on `device`, the same
    profile measured again now and not stored)."""
    dali_compile.offload(model, device=device, expert_memory=nbytes, policy="dali", prefetch=0)
    try:
        runtime = runtime_of(model)
        pool = runtime.pool  # its last slot is the scratch space (the runtime is released right after)
        return runtime.cost, measure_costs(runtime.accelerator, runtime.layers[0].spec, pool, pool.num_slots - 1)
    finally:
        dali_compile.release(model)


MEASURED = "measured"  # --profile: this machine's CPU profile, measured in this run (measured_profile)
MEASURED_BASE = "dev-2core+3090"  # its GPU side and host work


def measured_profile(costs: CostModel):
    """This machine's CPU profile, measured now: the streaming read bandwidth of the runtime's threads, the
    fp32 GEMM rate (torch.mm, 1024^3) and the CPU call's fixed part of the cost model just measured; the rest
    from MEASURED_BASE. The development machine changes from session to session (2-core AVX2 hosts at
    19-37 GB/s, an AVX-512 one at 41): a profile written on one of them mispredicts the others."""
    from dali_compile.runtime import cpu_extension

    bandwidth = cpu_extension.read_bandwidth_gbps(512 << 20, 3) * 1e9
    a = torch.randn(1024, 1024)
    torch.mm(a, a)
    seconds = []
    for _ in range(5):
        started = time.perf_counter()
        torch.mm(a, a)
        seconds.append(time.perf_counter() - started)
    base = hardware_profile(MEASURED_BASE)
    return dataclasses.replace(base, name=MEASURED, cpu_bytes_per_s=bandwidth,
                               cpu_flop_per_s=2 * 1024**3 / min(seconds), cpu_call_s=costs.cpu_call_seconds,
                               description=f"this machine's CPU, measured now; GPU as {MEASURED_BASE}")


# ---------------------------------------------------------------------------------------------------
# The replay and the comparison


def simulated_model(model, shape: ModelShape) -> SimulatedModel:
    """The model as the simulator sees it (the non-expert part only prices time, which is not compared)."""
    slot, _, experts, top_k = expert_geometry(model)
    itemsize = next(model.parameters()).element_size()
    gated_flop = 2 * 3 * shape.hidden * shape.intermediate
    dense = shape.hidden * shape.head_dim * 2 * (shape.heads + shape.kv_heads) + experts * shape.hidden
    return SimulatedModel(shape.name, experts, top_k, slot, gated_flop, dense * itemsize, 2 * dense)


def replay(measured: Measured, model: SimulatedModel, profile, cost: CostModel, budget_slots: int | None = None,
           tokens_per_step: int = 1, timing_cost: CostModel | None = None) -> SimulatedRun:
    """`simulate` over the measured routing with a fresh instance of the measured policy, deciding with `cost`
    (timing with `timing_cost` if given); `budget_slots` defaults to the measured run's (another value is a
    deliberately wrong replay)."""
    predictions = measured.predictions
    return simulate(make_policy(measured.policy), measured.counts, profile, model,
                    budget_slots=measured.budget_slots if budget_slots is None else budget_slots,
                    tokens_per_step=tokens_per_step, cost=cost, timing_cost=timing_cost,
                    prefetch=None if predictions is None else (lambda s, layer: predictions[(s, layer)]),
                    prefetch_count=measured.prefetch)


def replay_cost(measured: Measured, profiled: CostModel) -> CostModel:
    """The runtime's own cost model, or for a policy that needs none the one profiled for the same experts."""
    return measured.cost if measured.cost is not None else profiled


def compare(measured: Measured, simulated: SimulatedRun, cost: CostModel) -> Comparison:
    """Every counter of COUNTERS, and the copies of every step: measured against simulated."""
    r = simulated.replay
    got = measured.total
    values = {"steps": r.layer_steps, "hits": r.hits, "misses": r.misses, "copies": r.copies + r.prefetches,
              "prefetches": r.prefetches, "prefetch_hits": r.prefetch_hits, "experts_cpu": r.experts_cpu,
              "experts_gpu": r.experts_gpu, "tokens_cpu": r.tokens_cpu, "tokens_gpu": r.tokens_gpu}
    result = Comparison(measured, simulated, cost, [(name, getattr(got, name), values[name]) for name in COUNTERS])
    result.mismatches = [f"{name}: runtime {a}, simulator {b}" for name, a, b in result.counters if a != b]
    # per step: the replay counts prefetch copies apart
    runtime_copies = [sum(s.copies - s.prefetches for s in step) for step in measured.layer_stats]
    for s, (a, b) in enumerate(zip(runtime_copies, r.copies_per_step.tolist(), strict=True)):
        if a != b:
            result.mismatches.append(f"step {s} copies (prefetches apart): runtime {a}, simulator {b}")
    result.timed["runtime"] = (cost, simulated)
    return result


def validate(measured: Measured, model: SimulatedModel, profile, costs: dict[str, CostModel],
             tokens_per_step: int) -> Comparison:
    """Replay `measured` with the runtime's cost model (`costs['runtime']` for a policy that had none), compare
    the counters, and time the same decisions with every other cost model of `costs`."""
    cost = replay_cost(measured, costs["runtime"])
    result = compare(measured, replay(measured, model, profile, cost, tokens_per_step=tokens_per_step), cost)
    for name, timing in costs.items():
        if name != "runtime":
            result.timed[name] = (timing, replay(measured, model, profile, cost, tokens_per_step=tokens_per_step,
                                                 timing_cost=timing))
    return result


def _timed_trials(comparison: Comparison, timing: str) -> list[list[tuple[LayerTime, LayerStats]]]:
    """Per trial but the first (the warm-up; unless it is the only one): (simulated, measured) of its layer
    steps, the simulated ones timed with the `timing` cost model."""
    measured = comparison.measured
    pairs = list(zip(comparison.timed[timing][1].layer_times,
                     [s for step in measured.layer_stats for s in step], strict=True))
    size = measured.trial_steps * len(measured.layer_stats[0])
    trials = [pairs[first:first + size] for first in range(0, len(pairs), size)]
    return trials[1:] if len(trials) > 1 else trials


def cpu_times(comparison: Comparison, timing: str = "runtime") -> dict[str, list[tuple[float, float]]]:
    """Per timed trial, (simulated, measured) CPU expert seconds over its layer steps with CPU experts and no GPU
    expert ('alone') and over all its layer steps with CPU experts ('all')."""
    out = {"alone": [], "all": []}
    for trial in _timed_trials(comparison, timing):
        sums = {"alone": [0.0, 0.0], "all": [0.0, 0.0]}
        for t, s in trial:
            if s.experts_cpu:
                for key in ("alone", "all") if not s.experts_gpu else ("all",):
                    sums[key][0] += t.cpu_s
                    sums[key][1] += s.cpu_s
        for key, (simulated, measured) in sums.items():
            out[key].append((simulated, measured))
    return out


def gpu_times(comparison: Comparison, timing: str = "runtime") -> dict[str, list[tuple[float, float]]]:
    """Per timed trial, over its layer steps with GPU experts and none on the CPU: (simulated GPU path, measured
    expert phase) as 'path', (simulated copy seconds, measured copy waits) as 'copies'."""
    transfer = comparison.timed[timing][0].transfer_seconds
    out = {"path": [], "copies": []}
    for trial in _timed_trials(comparison, timing):
        gpu_only = [(t, s) for t, s in trial if s.experts_gpu and not s.experts_cpu]
        out["path"].append((sum(t.gpu_s for t, _ in gpu_only), sum(s.total_s - s.plan_s for _, s in gpu_only)))
        out["copies"].append((sum((s.copies - s.prefetches) * transfer for _, s in gpu_only),
                              sum(s.copy_wait_s for _, s in gpu_only)))
    return out


def median_ratio(trials: list[tuple[float, float]]) -> float:
    """The median over trials of simulated / measured (nan when nothing was measured): one disturbed trial
    (this machine is shared) does not move it."""
    ratios = [simulated / measured for simulated, measured in trials if measured > 0]
    return statistics.median(ratios) if ratios else math.nan


def median_ms(values) -> float:
    values = list(values)
    return 1e3 * statistics.median(values) if values else math.nan


def flag(value: float) -> str:
    if math.isnan(value):
        return ""
    return "ok" if abs(value - 1) <= CPU_TOLERANCE else "OUT"


# ---------------------------------------------------------------------------------------------------
# Report


def validate_model(shape: ModelShape, args) -> list[Comparison]:
    """Every budget and policy of one model shape."""
    started = time.perf_counter()
    cuda = args.device == "cuda"
    model = build_model(shape, args.dtype, "cuda" if cuda else "cpu")  # initialised on a GPU (fast), as bench_e2e
    model.to("cpu")  # offload takes the model from the host
    geometry = expert_geometry(model)
    slot, layers, experts, top_k = geometry
    print(f"\n{shape.name}: H={shape.hidden} I={shape.intermediate} E={experts} K={top_k} L={layers}, "
          f"{slot / 2**20:.2f} MiB per expert (built in {time.perf_counter() - started:.1f} s)", flush=True)
    prompt = torch.randint(0, shape.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to("cuda" if cuda else "cpu")
    stored, remeasured = profiled_costs(model, budget_bytes(geometry, max(args.budgets)), args.device)
    sim_model = simulated_model(model, shape)
    profile = measured_profile(remeasured) if args.profile == MEASURED else hardware_profile(args.profile)
    costs = {"runtime": stored, "remeasured": remeasured,
             "profile": profile.cost_model(sim_model.expert_bytes, sim_model.expert_flop_per_token)}
    print("  t_cpu(1, 8, 64 tokens) ms: " + ", ".join(
        f"{name} " + "/".join(f"{1e3 * t:.3f}" for t in cost.t_cpu([1, 8, 64])) for name, cost in costs.items()))
    results = []
    for fraction in args.budgets:
        nbytes = budget_bytes(geometry, fraction)
        for policy in args.policies:
            started = time.perf_counter()
            measured = run_policy(model, policy, nbytes, prompt, args.steps, args.device, f"{fraction:.0%}",
                                  args.trials)
            result = validate(measured, sim_model, profile, costs, args.batch)
            results.append(result)
            print(f"  {measured.budget:>4} {policy:<15} {nbytes // slot} slots: counters "
                  f"{'equal' if result.equal else 'MISMATCH'} ({time.perf_counter() - started:.1f} s)", flush=True)
            for line in result.mismatches:
                print(f"    MISMATCH {line}")
    return results


def record(model: str, result: Comparison) -> dict:
    """One CSV row: the counters (runtime and simulator), and for every timing the CPU and GPU-side times
    (medians over the timed trials)."""
    m = result.measured
    row = {"model": model, "budget": m.budget, "policy": m.policy, "budget_slots": m.budget_slots,
           "prefetch": m.prefetch, "counters_equal": result.equal}
    for name, got, simulated in result.counters:
        row[f"{name}_runtime"], row[f"{name}_simulator"] = got, simulated
    for timing in result.timed:
        times = {**{f"cpu_{k}": v for k, v in cpu_times(result, timing).items()},
                 **{f"gpu_{k}": v for k, v in gpu_times(result, timing).items()}}
        for key, trials in times.items():
            row[f"{key}_measured_ms"] = median_ms(measured for _, measured in trials)
            row[f"{key}_{timing}_ms"] = median_ms(simulated for simulated, _ in trials)
            row[f"{key}_{timing}_ratio"] = median_ratio(trials)
    return row


def print_counters(rows: list[dict]) -> None:
    short = {"steps": "lsteps", "prefetches": "pref", "prefetch_hits": "pf hit", "experts_cpu": "cpu exp",
             "experts_gpu": "gpu exp", "tokens_cpu": "cpu tok", "tokens_gpu": "gpu tok"}
    print("\ncounters over every trial: the runtime's (= the simulator's; else runtime/simulator)")
    print(f"{'model':<8} {'budget':>6} {'policy':<15} " + " ".join(f"{short.get(n, n):>7}" for n in COUNTERS)
          + f" {'counters':>8}")
    for row in rows:
        cells = []
        for name in COUNTERS:
            got, simulated = row[f"{name}_runtime"], row[f"{name}_simulator"]
            cells.append(f"{got:>7}" if got == simulated else f"{f'{got}/{simulated}':>7}")
        print(f"{row['model']:<8} {row['budget']:>6} {row['policy']:<15} " + " ".join(cells)
              + f" {'EQUAL' if row['counters_equal'] else 'MISMATCH':>8}")


def print_times(rows: list[dict], device: str) -> None:
    print(f"\nCPU expert time: simulated / measured, median over the trials after the first (+-{CPU_TOLERANCE:.0%}: "
          "ok, else OUT), simulated with the runtime's, the remeasured and the profile's cost model; 'alone': layer "
          "steps without a GPU expert (measured ms per trial), 'all': every layer step with a CPU expert; gpu: the "
          "GPU-only layer steps' simulated GPU path / measured expert phase"
          + ("" if device == "cuda" else " (emulated: meaningless)"))
    ratios = "".join(f" {t[:7]:>7} {'':>3}" for t in TIMINGS)
    print(f"{'model':<8} {'budget':>6} {'policy':<15} {'alone ms':>9}{ratios} {'all ms':>8} {'all rem':>7} {'':>3} "
          f"{'gpu rem':>7}")
    for row in rows:
        cells = "".join(f" {fmt(row[f'cpu_alone_{t}_ratio']):>7} {flag(row[f'cpu_alone_{t}_ratio']):>3}"
                        for t in TIMINGS)
        every = row["cpu_all_remeasured_ratio"]
        print(f"{row['model']:<8} {row['budget']:>6} {row['policy']:<15} "
              f"{fmt(row['cpu_alone_measured_ms'], '.1f'):>9}{cells} {fmt(row['cpu_all_measured_ms'], '.1f'):>8} "
              f"{fmt(every):>7} {flag(every):>3} {fmt(row['gpu_path_remeasured_ratio']):>7}")


def fmt(value: float, spec: str = ".2f") -> str:
    return "-" if math.isnan(value) or value == 0 else format(value, spec)


def write_csv(rows: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "validate_simulator.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["emulated", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "emulated")
    parser.add_argument("--models", nargs="+", choices=list(FULL), default=list(FULL))
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5],
                        help="fractions of all experts in the expert memory, plus K staging slots (as bench_e2e)")
    parser.add_argument("--batch", type=int, default=4, help="B sequences")
    parser.add_argument("--prompt-len", type=int, default=32, help="P tokens per sequence")
    parser.add_argument("--steps", type=int, default=None, help="N greedy decode steps (emulated 6, cuda 16)")
    parser.add_argument("--trials", type=int, default=4,
                        help="trials (prefill + decode); the first is the time comparisons' warm-up")
    parser.add_argument("--profile", default=MEASURED,
                        help="hardware profile: the 'profile' timing, the non-expert part and host work "
                             f"('{MEASURED}': this machine's CPU measured in this run, the GPU of {MEASURED_BASE})")
    parser.add_argument("--out", default=None, help="folder for validate_simulator.csv")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda is not available here")
    emulated = args.device == "emulated"
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 6 if emulated else 16)
    args.dtype = DTYPES["fp32" if emulated else "bf16"]
    if args.quick:
        args.shapes, args.batch, args.prompt_len = [QUICK], min(args.batch, 2), min(args.prompt_len, 8)
    else:
        args.shapes = [(REDUCED if emulated else FULL)[m] for m in args.models]
    if min(args.steps, args.batch, args.prompt_len, args.trials) < 1 or not all(0 <= b <= 1 for b in args.budgets):
        parser.error("steps, batch, prompt-len and trials must be >= 1, budgets fractions in [0, 1]")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"validating the simulator against the runtime on {args.device}: batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.steps} decode steps, {args.trials} trials, budgets {args.budgets}, eager; "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for shape in args.shapes:
        rows += [record(shape.name, result) for result in validate_model(shape, args)]
    print(f"\nload average {os.getloadavg()[0]:.2f} (the CPU times below need an otherwise idle machine)")
    print_counters(rows)
    print_times(rows, args.device)
    if args.out:
        print(f"wrote {write_csv(rows, Path(args.out))}")
    print(GPU_NOTE + ("" if args.device == "cuda" else " (this run: emulated, so not validated)"))
    for timing in TIMINGS:
        out = [f"{r['model']} {r['budget']} {r['policy']}" for r in rows
               if flag(r[f"cpu_alone_{timing}_ratio"]) == "OUT"]
        print(f"CPU expert time ('alone') outside +-{CPU_TOLERANCE:.0%} with the {timing} cost model: "
              + (", ".join(out) or "none"))
    failed = [r for r in rows if not r["counters_equal"]]
    if failed:
        print(f"FAIL: {len(failed)} of {len(rows)} runs' counters differ between the runtime and the simulator")
        return 1
    print(f"all {len(rows)} runs: the simulator's counters equal the runtime's")
    return 0


if __name__ == "__main__":
    sys.exit(main())

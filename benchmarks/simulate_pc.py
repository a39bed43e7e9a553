"""Benchmark (simulated): every policy's decode and prefill tokens/s on the papers' PCs, over real routing.

# B sequences per step, P prompt tokens per sequence, L MoE layers, E experts, K top-k

    python benchmarks/simulate_pc.py                               # every profile, Mixtral and DeepSeek-V2-Lite
    python benchmarks/simulate_pc.py --profiles dali-paper-pc --models mixtral-8x7b --batches 1 8
    python benchmarks/simulate_pc.py --host-us 280                 # dali+prefetch's measured host work (host_work.py)

No GPU has run the hybrid runtime yet, so this replays recorded routing through the real policies
(`dali_compile.runtime.simulator.simulate`: the planner, cache replacement and checks the runtime uses) and
models each layer step's time on a hardware profile (`dali_compile/runtime/hardware/*.json`, sources stated
inside: the DALI paper's RTX 3090 PC, the RTX 4090 + Threadripper of arXiv 2512.16473, and our 2-core CPU
with the 3090). Budget: the expert slots that fit the GPU's memory beside the model's other weights (bf16)
and 2 GiB for KV cache, activations and context (`simulator.expert_budget_slots`).

Routing (../shared/traces, never copied here): Mixtral-8x7B decode (E 8, K 2, its 32 layers; four prompts'
583 tokens back to back) for the Mixtral shape; FLAME-MoE-290M's 2048-token stream (E 64, K 6, 8 layers)
for the DeepSeek-V2-Lite shape (E 64, K 6), its 26 MoE layers taking the trace's layers in turn (layer l
routes as trace layer l mod 8). Decode: steps of B consecutive tokens. Prefill: steps of B * P tokens (P =
64, the paper's prompt). At most --max-steps steps per point (default 256), as many as the trace holds.
Qwen3-30B-A3B has no 128-expert trace here: not run. The traces have no hidden states, so `dali` runs
without residual prefetch on them (its greedy plans and workload-aware cache only).

`--models tiny-shakespeare`: routing recorded through the runtime from the trained tiny MoE
(../shared/models/tiny_shakespeare_moe, `--tiny-checkpoint`; E 32, K 4, 8 layers) reading held-out text
(prefetch_accuracy.py's recording: Hamlet, calibrated on Macbeth), with its real residual predictions: the
`dali+prefetch` row prefetches P = 2 experts per layer from them (`simulate`'s prefetch, the runtime's own
choice), `dali` beside it without. Its experts are given Qwen3-30B-A3B's size (and dense part), and a budget
of a quarter of its experts, to put the routing on a real model's cost: a routing experiment, not a model.

Baselines (DESIGN.md section 6) and the DALI paper's reported speedups of DALI over them (decode / prefill,
averaged over its models and batches 8-128): all_cpu and layerwise stand for KTransformers (2.16x / 3.80x),
threshold for HybriMoE (1.32x / 2.00x); on_demand, lru and cache_cpu_miss have no number there.
Columns: tokens/s (all sequences), dali's speedup over the policy (dali tok/s / its tok/s), busy shares of
the simulated time (CPU experts, GPU incl. the non-expert part, PCIe), copies per token (prefetches
included), cache hit rate (prefetched experts not counted), and the share of prefetched experts used.
Not modelled: see the simulator's docstring (lm_head and sampling, contention, KV growth, chunking).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bench_planner import write_csv  # the sibling script's
from model_shapes import ModelShape, model_shape

from dali_compile.runtime.policies import make_policy
from dali_compile.runtime.replay import counts_from_trace
from dali_compile.runtime.simulator import (
    HardwareProfile,
    SimulatedModel,
    expert_budget_slots,
    hardware_profile,
    hardware_profiles,
    simulate,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(REPO, "..", "shared", "traces")
MIXTRAL_STREAMS = ("humaneval_p0", "humaneval_p1", "gsm8k_p0", "gsm8k_p1")
POLICIES = ("dali", "all_cpu", "layerwise", "threshold", "cache_cpu_miss", "lru", "on_demand")
PAPER = {"all_cpu": (2.16, 3.80), "layerwise": (2.16, 3.80), "threshold": (1.32, 2.00)}  # (decode, prefill)
PROMPT = 64
PREFETCH = 2  # P for 32 experts (prefetch.default_prefetch_count)
TINY_CHECKPOINT = os.path.join(REPO, "..", "shared", "models", "tiny_shakespeare_moe")


@dataclass(frozen=True)
class Row:
    profile: str
    model: str
    phase: str
    batch: int
    policy: str
    budget_slots: int
    tokens_per_s: float
    dali_speedup: float  # dali's tokens/s over this policy's
    paper_speedup: float  # the DALI paper's reported speedup over the system this policy stands for (nan: none)
    cpu_busy: float  # shares of the simulated time
    gpu_busy: float
    pcie_busy: float
    copies_per_token: float
    hit_rate: float
    prefetch_hit_rate: float  # prefetched experts used in their step (nan: no prefetch)


def trace_ids(model: str, traces_dir: str) -> np.ndarray:
    """Expert ids int [T, L, K] of the model's routing (module docstring)."""
    name = "mixtral_8x7b_instruct_fp8_vllm_routing.npz" if model == "mixtral-8x7b" else "flame_moe_290m_routing.npz"
    path = os.path.join(traces_dir, name)
    if not os.path.exists(path):
        sys.exit(f"simulate_pc: trace {path} not found (see ../shared/traces/README.md); pass --traces-dir")
    data = np.load(path)
    if model == "mixtral-8x7b":
        return np.concatenate([data[f"{s}_decode_expert_ids"] for s in MIXTRAL_STREAMS])
    ids = data["stream_expert_ids"]
    return ids[:, [layer % ids.shape[1] for layer in range(model_shape(model).moe_layers)]]


def simulated_model(shape: ModelShape) -> SimulatedModel:
    dense = shape.dense_params_per_layer
    return SimulatedModel(shape.name, shape.experts, shape.top_k, shape.bytes, shape.flop_per_token, 2 * dense,
                          2 * dense)


@dataclass(frozen=True)
class Routing:
    """A model's routing for the simulator, with its predictions where it has them."""

    shape: ModelShape  # the shape whose costs the simulation uses (E and K of the routing)
    ids: np.ndarray  # int [T, L, K]
    budget_slots: int | None = None  # None: what fits the profile's GPU (expert_budget_slots)
    gate_predicted: list | None = None  # per layer l >= 1: (ids [T, K], weights [T, K]) the residual predictor gives


def tiny_routing(checkpoint: str, tokens: int) -> Routing:
    """The trained tiny MoE's routing and residual predictions (module docstring)."""
    import torch
    from prefetch_accuracy import load_checkpoint, recorded_routing, route, windows
    from train_tiny_moe import play_texts, split_ids

    model, tokenizer, training = load_checkpoint(Path(checkpoint))
    context, splits, plays = int(training["args"]["context"]), training["splits"], play_texts()
    calibration = windows(split_ids(tokenizer, plays, splits["calibration"]), context, 16384)
    evaluation = windows(split_ids(tokenizer, plays, splits["evaluation"]), context, max(tokens, context))
    with torch.no_grad():
        trace, routers, residuals, _ = recorded_routing(model, calibration, evaluation, 32)
    ids, gates = trace["stream_expert_ids"].astype(np.int64), trace["stream_gate_inputs"]
    predicted = [None] + [route(routers[l], gates[:, l - 1] + residuals[l - 1]) for l in range(1, ids.shape[1])]
    config = model.config
    qwen3 = model_shape("qwen3-30b-a3b")
    shape = ModelShape("tiny-shakespeare", qwen3.hidden, qwen3.intermediate, config.num_experts,
                       config.num_experts_per_tok, ids.shape[1], qwen3.dense_params_per_layer, qwen3.vocab)
    return Routing(shape, ids, budget_slots=ids.shape[1] * config.num_experts // 4, gate_predicted=predicted)


def step_predictions(routing: Routing, tokens_per_step: int, steps: int):
    """simulate's prefetch: per (step, layer) the predicted tokens and routing weight per expert."""
    E, table = routing.shape.experts, {}
    for layer, pair in enumerate(routing.gate_predicted):
        if pair is None:
            continue
        ids, weights = pair[0][: steps * tokens_per_step], pair[1][: steps * tokens_per_step]
        step = np.repeat(np.arange(steps), ids.shape[1] * tokens_per_step)
        counts, mass = np.zeros((steps, E), dtype=np.int64), np.zeros((steps, E))
        np.add.at(counts, (step, ids.reshape(-1)), 1)
        np.add.at(mass, (step, ids.reshape(-1)), weights.reshape(-1).astype(np.float64))
        table[layer] = (counts, mass)
    return lambda s, layer: (table[layer][0][s], table[layer][1][s])


def run_point(profile: HardwareProfile, routing: Routing, phase: str, batch: int, max_steps: int) -> list[Row]:
    shape = routing.shape
    tokens_per_step = batch if phase == "decode" else batch * PROMPT
    counts = counts_from_trace(routing.ids, shape.experts, tokens_per_step)[:max_steps]
    if not len(counts):
        return []
    model = simulated_model(shape)
    budget = routing.budget_slots
    if budget is None:
        budget = expert_budget_slots(profile, shape.non_expert_bytes, shape.bytes, shape.experts * shape.moe_layers)
    runs = {name: simulate(make_policy(name), counts, profile, model, budget_slots=budget,
                           tokens_per_step=tokens_per_step) for name in POLICIES}
    if routing.gate_predicted is not None:
        runs["dali+prefetch"] = simulate(make_policy("dali"), counts, profile, model, budget_slots=budget,
                                         tokens_per_step=tokens_per_step, prefetch_count=PREFETCH,
                                         prefetch=step_predictions(routing, tokens_per_step, len(counts)))
    dali = runs["dali"].tokens_per_s
    rows = []
    for name, run in runs.items():
        paper = PAPER.get(name, (float("nan"),) * 2)[phase == "prefill"]
        replay = run.replay
        rows.append(Row(profile.name, shape.name, phase, batch, name, budget, run.tokens_per_s,
                        dali / run.tokens_per_s, paper, run.cpu_busy_s / run.seconds, run.gpu_busy_s / run.seconds,
                        run.pcie_busy_s / run.seconds, (replay.copies + run.prefetches) / run.tokens,
                        replay.hit_rate, run.prefetch_hits / run.prefetches if run.prefetches else float("nan")))
    return rows


def print_rows(rows: list[Row]) -> None:
    print(f"{'profile':22} {'model':17} {'phase':7} {'B':>4} {'policy':15} {'slots':>5} {'tok/s':>9} "
          f"{'dali x':>7} {'paper':>6} {'cpu':>5} {'gpu':>5} {'pcie':>5} {'copy/tok':>8} {'hits':>5} {'pf hit':>6}")
    for r in rows:
        paper = "" if np.isnan(r.paper_speedup) else f"{r.paper_speedup:.2f}x"
        print(f"{r.profile:22} {r.model:17} {r.phase:7} {r.batch:4} {r.policy:15} {r.budget_slots:5} "
              f"{r.tokens_per_s:9.2f} {r.dali_speedup:6.2f}x {paper:>6} {r.cpu_busy:5.0%} {r.gpu_busy:5.0%} "
              f"{r.pcie_busy:5.0%} {r.copies_per_token:8.2f} {r.hit_rate:5.0%} "
              f"{'' if np.isnan(r.prefetch_hit_rate) else f'{r.prefetch_hit_rate:.0%}':>6}")


def plot(rows: list[Row], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    panels = sorted({(r.profile, r.model, r.phase) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (profile, model, phase) in zip(axes[:, 0], panels, strict=True):
        mine = [r for r in rows if (r.profile, r.model, r.phase) == (profile, model, phase)]
        batches = sorted({r.batch for r in mine})
        policies = list(dict.fromkeys(r.policy for r in mine))
        for i, policy in enumerate(policies):
            values = [next((r.tokens_per_s for r in mine if r.batch == b and r.policy == policy), 0) for b in batches]
            ax.bar(np.arange(len(batches)) + i / (len(policies) + 1), values, 1 / (len(policies) + 1), label=policy)
        ax.set_xticks(np.arange(len(batches)) + 0.4, [f"B={b}" for b in batches])
        ax.set_yscale("log")
        ax.set_title(f"{profile}, {model}, {phase} (tokens/s, simulated)", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=None, help="shipped names or .json paths (default: all)")
    parser.add_argument("--models", nargs="+", default=["mixtral-8x7b", "deepseek-v2-lite", "tiny-shakespeare"],
                        choices=["mixtral-8x7b", "deepseek-v2-lite", "tiny-shakespeare"])
    parser.add_argument("--tiny-checkpoint", default=TINY_CHECKPOINT)
    parser.add_argument("--tiny-tokens", type=int, default=4096, help="held-out characters the tiny MoE reads")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--phases", nargs="+", default=["decode", "prefill"], choices=["decode", "prefill"])
    parser.add_argument("--host-us", type=float, default=None,
                        help="host work per MoE layer step in microseconds (default: the profile's)")
    parser.add_argument("--max-steps", type=int, default=256, help="steps simulated per point at most")
    parser.add_argument("--traces-dir", default=TRACES)
    parser.add_argument("--csv", default="simulate_pc.csv")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches) or args.max_steps < 1:
        parser.error("--batches and --max-steps must be >= 1")
    if args.host_us is not None and args.host_us < 0:
        parser.error("--host-us must be >= 0")
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    profiles = [hardware_profile(p) for p in args.profiles] if args.profiles else list(hardware_profiles().values())
    if args.host_us is not None:
        profiles = [p.with_host_layer_s(args.host_us * 1e-6) for p in profiles]
    rows, routings = [], {}
    for profile in profiles:
        print(f"{profile.name}: {profile.description}; host work {profile.host_layer_s * 1e6:.0f} us per layer step")
        for name in args.models:
            if name not in routings:
                routings[name] = (tiny_routing(args.tiny_checkpoint, args.tiny_tokens) if name == "tiny-shakespeare"
                                  else Routing(model_shape(name), trace_ids(name, args.traces_dir)))
            for phase in args.phases:
                for batch in args.batches:
                    rows += run_point(profile, routings[name], phase, batch, args.max_steps)
    print_rows(rows)
    if rows:
        write_csv(args.csv, rows)
        if not args.no_plot:
            plot(rows, os.path.splitext(args.csv)[0] + ".png")
    return rows


if __name__ == "__main__":
    main()

"""Benchmark: how well each predictor names layer l+1's busiest experts, on the model `train_tiny_moe.py` trained.

# T tokens, L MoE layers, E experts, K top-k, H hidden, B batch (tokens per step), P prefetched experts

    python benchmarks/train_tiny_moe.py                           # once: the trained checkpoint
    python benchmarks/prefetch_accuracy.py                        # P by E (2 for 32 experts) and P=4, B = 1 8 32
    python benchmarks/prefetch_accuracy.py --checkpoint /tmp/tiny_moe --top-p 1 2 4 --batch-sizes 1 4 16 64

The DALI paper's prefetch question (arXiv 2602.03495): while layer l runs a step of B tokens, which P
experts of layer l+1 will carry the most tokens? Truth: the top-P experts of layer l+1 by the tokens the
model really routes to them in the step. Predictors (each ranks experts by predicted tokens, ties broken
by the summed router weight, then by expert id):
- residual: layer l+1's router on x_l + res_vec(l), res_vec(l) the mean of x_{l+1} - x_l over calibration
  text (`runtime.prefetch.measure_residuals`): what `dali_compile.offload(..., policy="dali")` prefetches;
- residual, id ties: the same counts with ties broken by expert id only, as the runtime's `prefetch_for`
  does (at B=1 every predicted expert has one token, so this is where the rules differ);
- next gate: layer l+1's router on x_l itself (res_vec = 0: uncalibrated);
- same as l: layer l's own experts (ids as they come: layers' experts have nothing in common);
- popular: layer l+1's most used experts over the calibration text, every step the same;
- random: P experts drawn at random (the chance level: P / E where the true top-P is unique, more where
  experts tie, as at B=1, where any of the token's K experts counts).
Accuracy = |predicted ∩ true top-P| / P, averaged over the steps (B consecutive tokens of held-out text)
and the layers l = 0 .. L-2; where the P-th and later experts tie on tokens, any of them counts as a hit
up to P (at B=1 a token's K experts all tie), and a step with fewer than P active experts divides by
that number.

The routing comes from the runtime itself: the model is offloaded (all-CPU, emulated device: no GPU
needed) and `runtime.recorder.record_routing` records every step's expert ids and gate inputs, so this is
also the recorder's end-to-end check. Calibration and evaluation text are whole plays held out from
training (`training.json`). Prints a table, writes a CSV, plots a PNG if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_moe import DEFAULT_OUT, play_texts, split_ids  # noqa: E402  (the sibling script)

import dali_compile  # noqa: E402
from dali_compile.char_tokenizer import CharTokenizer  # noqa: E402
from dali_compile.offload import runtime_of  # noqa: E402
from dali_compile.runtime.prefetch import default_prefetch_count, find_router, measure_residuals  # noqa: E402
from dali_compile.runtime.recorder import record_routing  # noqa: E402

PREDICTORS = ("residual", "residual, id ties", "next gate", "same as l", "popular", "random")


@dataclass(frozen=True)
class Row:
    top_p: int
    batch: int
    predictor: str
    layer: str  # "mean" or the predicted layer l+1
    accuracy: float
    steps: int


# --------------------------------------------------------------------------------------- the routing


def route(router: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [T, K], weights float32 [T, K]) the router gives gate inputs x [T, H]."""
    with torch.no_grad():
        out = router(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    ids = next(t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2)
    weights = [t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == ids.shape]
    if not weights:
        raise ValueError(f"{type(router).__name__} returns no [T, K] weights next to its expert ids")
    return ids.numpy().astype(np.int64), weights[-1].float().numpy()


def step_scores(ids: np.ndarray, weights: np.ndarray, batch: int, num_experts: int) -> np.ndarray:
    """Per step of `batch` consecutive tokens, tokens per expert plus a tie-break below one token (the summed
    router weight, < batch + 1): float64 [S, E], S = T // batch."""
    steps = ids.shape[0] // batch
    ids, weights = ids[: steps * batch], weights[: steps * batch]
    step = np.repeat(np.arange(steps), ids.shape[1] * batch).reshape(steps * batch, -1)
    counts = np.zeros((steps, num_experts))
    mass = np.zeros((steps, num_experts))
    np.add.at(counts, (step, ids), 1.0)
    np.add.at(mass, (step, ids), weights.astype(np.float64))
    return counts + mass / (batch + 1)


def top_experts(scores: np.ndarray, p: int) -> np.ndarray:
    """int64 [S, P]: the P highest-scoring experts of each step, ties to the lower id."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :p]


def accuracy(predicted: np.ndarray, true_counts: np.ndarray, p: int) -> np.ndarray:
    """float [S]: |predicted ∩ true top-P| / P, where experts tied with the P-th count as hits up to P."""
    kth = -np.sort(-true_counts, axis=1)[:, p - 1 : p]
    above = true_counts > kth
    tied = (true_counts == kth) & (true_counts > 0)
    hits = np.take_along_axis(above, predicted, axis=1).sum(axis=1)
    tie_hits = np.take_along_axis(tied, predicted, axis=1).sum(axis=1)
    room = p - above.sum(axis=1)
    active = (true_counts > 0).sum(axis=1)
    return (hits + np.minimum(tie_hits, room)) / np.minimum(p, active)


# ------------------------------------------------------------------------------------------- driving


def load_checkpoint(directory: Path):
    from transformers import AutoModelForCausalLM

    needed = ("config.json", "model.safetensors", "vocab.json", "training.json")
    missing = [name for name in needed if not (directory / name).exists()]
    if missing:
        raise SystemExit(f"no trained model at {directory} (missing {', '.join(missing)}): run "
                         f"`python benchmarks/train_tiny_moe.py --out {directory}` first (about 20 minutes on 1 core)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    training = json.loads((directory / "training.json").read_text())
    return model, CharTokenizer.load(directory), training


def windows(ids: torch.Tensor, context: int, max_chars: int) -> torch.Tensor:
    """The first `max_chars` ids as [N, context] rows (row-major: consecutive text)."""
    usable = min(ids.numel(), max_chars) // context * context
    if usable < context:
        raise SystemExit(f"the text has {ids.numel()} characters, fewer than one window of {context}")
    return ids[:usable].reshape(-1, context)


def record(model, windows_: torch.Tensor, chunk: int) -> dict[str, np.ndarray]:
    """The runtime's recording (fp32 gate inputs) of the model reading `windows_` [N, C], `chunk` rows a call."""
    with record_routing(model, gate_dtype=torch.float32) as recording, torch.no_grad():
        for start in range(0, windows_.shape[0], chunk):
            model(input_ids=windows_[start:start + chunk])
    return recording.arrays()


def recorded_routing(model, calibration: torch.Tensor, evaluation: torch.Tensor, chunk: int):
    """Through the runtime (all-CPU, emulated device): the routers, the residual vectors measured on
    `calibration`, each layer's expert popularity there [L, E], and the recording of `evaluation` (see record).
    Returns (trace, routers, residuals, popular); the model is released again."""
    config = model.config
    E, L = config.num_experts, config.num_hidden_layers
    dali_compile.offload(model, device="emulated", expert_memory="1MiB", policy="all_cpu")
    try:
        runtime = runtime_of(model)
        routers = [find_router(model.get_submodule(layer.name.rpartition(".")[0]), E, config.hidden_size)
                   for layer in runtime.layers]
        with record_routing(model, gate_inputs=False) as recording:
            residuals = [r.numpy() for r in measure_residuals(model, routers, calibration)]
        calibration_ids = recording.arrays()["stream_expert_ids"].astype(np.int64)
        popular = np.stack([np.bincount(calibration_ids[:, l].ravel(), minlength=E) for l in range(L)])
        trace = record(model, evaluation, chunk)
    finally:
        dali_compile.release(model)
    return trace, routers, residuals, popular


def evaluate(trace: dict[str, np.ndarray], routers, residuals, popular: np.ndarray, batches, top_ps,
             seed: int) -> list[Row]:
    ids, weights = trace["stream_expert_ids"].astype(np.int64), trace["stream_scores"]
    gates = trace["stream_gate_inputs"]
    L, E = ids.shape[1], int(trace["num_experts"])
    rng = np.random.default_rng(seed)
    per_layer = {}  # (P, B, predictor) -> [L-1] accuracies
    steps = {}
    for layer in range(L - 1):
        nxt = layer + 1
        routed = {
            "residual": route(routers[nxt], gates[:, layer] + residuals[layer]),
            "next gate": route(routers[nxt], gates[:, layer]),
            "same as l": (ids[:, layer], weights[:, layer]),
        }
        for batch in batches:
            truth = step_scores(ids[:, nxt], weights[:, nxt], batch, E).astype(np.int64)  # the floor: counts
            S = truth.shape[0]
            scores = {name: step_scores(*routed[name], batch, E) for name in routed}
            scores["residual, id ties"] = np.floor(scores["residual"])
            scores["popular"] = np.broadcast_to(popular[nxt] + 0.0, (S, E))
            for p in top_ps:
                for name in PREDICTORS:
                    if name == "random":
                        predicted = rng.random((S, E)).argsort(axis=1)[:, :p]
                    else:
                        predicted = top_experts(scores[name], p)
                    per_layer.setdefault((p, batch, name), []).append(float(accuracy(predicted, truth, p).mean()))
                    steps[(p, batch, name)] = S
    rows = []
    for (p, batch, name), values in per_layer.items():
        rows.append(Row(p, batch, name, "mean", float(np.mean(values)), steps[(p, batch, name)]))
        rows += [Row(p, batch, name, str(l + 1), v, steps[(p, batch, name)]) for l, v in enumerate(values)]
    return rows


def print_table(rows: list[Row], batches, top_ps) -> None:
    means = {(r.top_p, r.batch, r.predictor): r.accuracy for r in rows if r.layer == "mean"}
    for p in top_ps:
        print(f"\nP = {p}: accuracy of the predicted top-{p} experts of layer l+1 (mean over layers and steps)")
        print(f"{'predictor':<20}" + "".join(f"{f'B={b}':>9}" for b in batches))
        for name in PREDICTORS:
            print(f"{name:<20}" + "".join(f"{means[(p, b, name)]:>9.3f}" for b in batches))


def check_target(rows: list[Row], batches, top_ps) -> bool:
    means = {(r.top_p, r.batch, r.predictor): r.accuracy for r in rows if r.layer == "mean"}
    all_met = True
    for p in top_ps:
        margins = [means[(p, b, "residual")] - means[(p, b, "next gate")] for b in batches]
        met = all(m > 0 for m in margins)
        all_met &= met
        detail = ", ".join(f"B={b}: {means[(p, b, 'residual')]:.3f} vs {means[(p, b, 'next gate')]:.3f}"
                           for b in batches)
        print(f"target (residual > next gate at every batch size), P={p}: {'MET' if met else 'NOT MET'} ({detail})")
    return all_met


def plot(rows: list[Row], batches, top_ps, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib for one)")
        return
    means = {(r.top_p, r.batch, r.predictor): r.accuracy for r in rows if r.layer == "mean"}
    fig, axes = plt.subplots(1, len(top_ps), figsize=(5 * len(top_ps), 4), squeeze=False)
    for ax, p in zip(axes[0], top_ps, strict=True):
        for name in PREDICTORS:
            ax.plot(batches, [means[(p, b, name)] for b in batches], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(0, 1)
        ax.set_xlabel("batch size B (tokens per step)")
        ax.set_ylabel(f"top-{p} accuracy, layer l+1")
        ax.set_title(f"P = {p}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_OUT,
                   help=f"train_tiny_moe.py's --out (default {DEFAULT_OUT})")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--top-p", type=int, nargs="+", default=None,
                   help="P values (default: the paper's P for the expert count, and 4)")
    p.add_argument("--calibration-chars", type=int, default=16384, help="characters of the calibration play")
    p.add_argument("--evaluation-chars", type=int, default=32768, help="characters of the evaluation play")
    p.add_argument("--chunk", type=int, default=32, help="windows per forward call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="for the random predictor")
    p.add_argument("--csv", type=Path, default=Path("prefetch_accuracy.csv"))
    p.add_argument("--plot", type=Path, default=Path("prefetch_accuracy.png"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, training = load_checkpoint(args.checkpoint)
    config = model.config
    E, K, L = config.num_experts, config.num_experts_per_tok, config.num_hidden_layers
    top_ps = args.top_p or sorted({default_prefetch_count(E), min(4, E)})
    if any(p < 1 or p > E for p in top_ps) or any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f"P must be in 1..{E} and batch sizes >= 1")
    context = int(training["args"]["context"])
    plays = play_texts()
    splits = training["splits"]
    calibration = windows(split_ids(tokenizer, plays, splits["calibration"]), context, args.calibration_chars)
    evaluation = windows(split_ids(tokenizer, plays, splits["evaluation"]), context, args.evaluation_chars)
    print(f"checkpoint {args.checkpoint}: Qwen3-MoE L={L} E={E} K={K} H={config.hidden_size}, validation loss "
          f"{training['validation_loss']:.3f} vs unigram {training['unigram_loss']:.3f} nats/char")
    print(f"calibration {splits['calibration']} {calibration.numel()} chars, evaluation {splits['evaluation']} "
          f"{evaluation.numel()} chars, P = {top_ps}, B = {args.batch_sizes}")

    trace, routers, residuals, popular = recorded_routing(model, calibration, evaluation, args.chunk)
    print(f"recorded {trace['stream_expert_ids'].shape[0]} evaluation tokens through the runtime; "
          f"|res_vec| / |x| per layer: " + " ".join(
              f"{np.linalg.norm(r) / np.linalg.norm(trace['stream_gate_inputs'][:, l], axis=1).mean():.2f}"
              for l, r in enumerate(residuals)))

    rows = evaluate(trace, routers, residuals, popular, args.batch_sizes, top_ps, args.seed)
    print_table(rows, args.batch_sizes, top_ps)
    print()
    check_target(rows, args.batch_sizes, top_ps)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(f"CSV: {args.csv} (per layer and mean)")
    plot(rows, args.batch_sizes, top_ps, args.plot)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

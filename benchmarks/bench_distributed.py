"""Benchmark of the distributed mode's expert predictors, on the model `train_tiny_moe.py` trained.

# L MoE layers, E experts, K top-k, H hidden, P prompt tokens, N decode steps, d look-ahead distance (layers)

    python benchmarks/bench_distributed.py                                   # N=64, P=64, d = 1 2 3 4
    python benchmarks/bench_distributed.py --tokens 128 --prompt-length 32 --distances 1 2 --csv recall.csv

Section 1, predictor recall (CPU only, one process: no torch.distributed). The main model (the checkpoint in
fp32) decodes one sequence greedily from a prompt of held-out text (`training.json`'s evaluation play);
forward hooks on every MoE layer's router (`find_router`, parsed with `routing_of`) record the experts it
really routes to and its gate input, at every layer of every step. Step 0 is the prefill (the prompt), steps
1..N the decode steps (one token each).

Predictors, each naming the K experts of (token t, layer l):
- shadow-<precision>: a copy of the model converted by `distributed.shadow.make_shadow` (bf16; int8 = int8
  experts and dense layers by `dali_compile.quantize`, on the CPU C++ runtime; `same` = the fp32 model
  itself, a check of the simulation: it must give 100%, but cannot tell re-aligned keys and values from its
  own, so each re-aligned run also prints the largest difference between its cache and the main's over the
  positions before the last step, which must be 0), its own router's top-k. Simulated by the shadow
  rank's own code (`Shadow._run` fed the TOKENS messages the main rank would send): with re-alignment each
  step gets the main model's input token and overwrites its cache's last positions with the main model's
  keys and values of the previous step's tokens (`Shadow._align`); without, it feeds its own greedy token
  and keeps its own cache (the same prompt at the prefill). A third variant, tokens-only (`shadow-<precision>
  tokens-only`), takes the main's token but keeps its own cache (TOKENS messages without keys and values, which
  `Shadow._align` ignores): it separates what the token and what the keys and values re-align.
- residual: layer l's router on x_{l-d} + res_vec(l-d) + ... + res_vec(l-1), x_j the main model's gate
  input of layer j, res_vec(j) the mean of x_{j+1} - x_j over a calibration slice of text
  (`measure_residuals`, the calibration play, never the prompt's): the main-side predictor, d layers on.
- next_gate: the same with every res_vec = 0 (uncalibrated).

Look-ahead distance d: the prediction for (t, l) must exist when the main model reaches layer l - d.
- Single-node predictors need x_{l-d} of the same token: they cover layers l >= d only.
- The shadow starts step t when the main model does (with the main's token t and, re-aligned, its keys and
  values of step t-1), so for l >= d its prediction is its ordinary step t. For l < d the prediction is
  needed while the main model still runs step t-1 (at its layer L - (d - l)), before token t is known: the
  shadow then speculates (`Shadow._speculate`, run at the end of its step t-1 as the shadow rank runs it):
  one extra step from each of its --speculative-tokens most likely next tokens (default 2; 1 = its greedy
  token alone) on its cache not yet re-aligned with step t-1 (that step's positions still hold its own keys
  and values), each cropped back afterwards, the prediction being the union of their experts (up to K times
  the candidates); tokens-only speculates the same way. d is at most L (a single speculative step).
  Without re-alignment the shadow needs nothing of the main's step, so its prediction
  is the same at every d (as shadow.py deploys it, it still waits for the main's TOKENS message; starting it
  earlier changes no prediction).

Recall = |predicted ∩ actual| / |actual| per (token, layer), averaged over the decode steps' (step, layer)
cells the predictor covers at that distance; the table also splits it into layers l >= d (the cells every
predictor covers: the like-for-like comparison) and l < d (the shadow's speculative cells); loads/K is what the
recall costs, the distinct experts predicted per (token, layer) over K (1 for a top-k prediction, up to the
candidates in speculative cells), averaged like the recall. The prefill is
excluded from that table and reported on its own (every prompt token; the shadows with no look-ahead limit,
since they cannot speculate a prompt, the single-node predictors at d = 1). Targets (the issue): re-aligned
bf16 shadow >= 99%, int8 >= 97% (judged on every decode row, speculative cells included), re-alignment
measurably better than none (here: by at least MEASURABLE recall, at the same precision and distance; judged
for the precisions with a target but `same`, whose runs never differ). Prints the tables; `--csv PATH` writes
every row. One sequence is measured: a few flipped greedy tokens move the shadows' numbers by tenths of a
point, and the no-realign rows mostly tell whether and when the shadow's greedy text leaves the main's (try
other `--prompt-offset`s).

Section 2, decode speed (`distributed_speed.py`; `--sections speed`, `--speed-model` ...): the distributed
command under torchrun beside one process with every expert resident and the single-node dali policy at the
same expert memory, bytes moved per step, recall that arrived in time, copies. Do not run it beside anything
else: it times.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_speed  # noqa: E402  (section 2, a sibling file)
from train_tiny_moe import play_texts, split_ids  # noqa: E402  (the sibling script)

from dali_compile.char_tokenizer import CharTokenizer  # noqa: E402
from dali_compile.distributed.layers import moe_layers  # noqa: E402
from dali_compile.distributed.messages import Kind, Message  # noqa: E402
from dali_compile.distributed.shadow import SPECULATIVE_CANDIDATES, Shadow, make_shadow  # noqa: E402
from dali_compile.distributed.topology import Topology  # noqa: E402
from dali_compile.hf_compat import cache_keyword  # noqa: E402
from dali_compile.runtime.prefetch import find_router, measure_residuals, routing_of  # noqa: E402

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "tiny_shakespeare_moe"
TARGETS = {"same": 1.0, "bf16": 0.99, "int8": 0.97}  # re-aligned shadow recall ("same": the simulation's check)
MEASURABLE = 0.005  # re-alignment must beat none by this much recall (0.5 points) to count as measurably better
ALIGNMENTS = {"full": "", "tokens": " tokens-only", "none": " no-realign"}  # shadow variant -> name suffix
SIMULATED_TOPOLOGY = Topology(world_size=3, groups=1, shadow=True)  # Shadow's bookkeeping only: nothing is sent


# ------------------------------------------------------------------------------------------- the model


def load_model(directory: Path):
    from transformers import AutoModelForCausalLM

    if not (directory / "model.safetensors").exists():
        raise SystemExit(f"no trained model at {directory}: run "
                         f"`python benchmarks/train_tiny_moe.py --out {directory}`")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def routers_of(model) -> list[torch.nn.Module]:
    """Every MoE layer's router, in model order (as the main and shadow ranks find them)."""
    layers = moe_layers(model)
    spec = layers[0][2]
    return [find_router(model.get_submodule(name.rpartition(".")[0]), spec.num_experts, spec.hidden_size)
            for name, _, _ in layers]


class Recorder:
    """Forward hooks on the routers: each layer's top-k ids [T, K] and gate input [T, H] (fp32) of a step."""

    def __init__(self, routers: list[torch.nn.Module]):
        self.routers = routers
        self.ids: dict[int, torch.Tensor] = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> Recorder:
        self.handles = [router.register_forward_hook(self._hook(layer)) for layer, router in enumerate(self.routers)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer: int):
        def hook(module, args, output):
            self.ids[layer] = routing_of(output)[0].detach().to("cpu", torch.int64)
            self.gates[layer] = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float32)
        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ids, gate inputs) per layer of the step that just ran; a layer that did not run is an error."""
        if len(self.ids) != len(self.routers):
            raise RuntimeError(f"the step ran {len(self.ids)} of {len(self.routers)} routers")
        taken = ([self.ids[l] for l in range(len(self.routers))], [self.gates[l] for l in range(len(self.routers))])
        self.ids, self.gates = {}, {}
        return taken


@dataclass
class Trace:
    """The main model's run: per step (0 = prefill) its input ids [1, T], past length, and per layer the actual
    top-k ids [T, K] and gate inputs [T, H]; its final cache (the keys and values the main rank sends)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    pasts: list[int] = field(default_factory=list)
    ids: list[list[torch.Tensor]] = field(default_factory=list)
    gates: list[list[torch.Tensor]] = field(default_factory=list)
    cache: object = None


@torch.no_grad()
def decode_main(model, prompt: torch.Tensor, steps: int) -> Trace:
    """Greedy decode: the prefill of `prompt` [P], then `steps` one-token steps, recording the routing."""
    from transformers import DynamicCache

    trace, keyword = Trace(), cache_keyword(model)
    trace.cache = DynamicCache(config=model.config)
    input_ids = prompt[None]
    with Recorder(routers_of(model)) as recorder:
        for _ in range(steps + 1):
            trace.inputs.append(input_ids)
            trace.pasts.append(trace.cache.get_seq_length())
            logits = model(input_ids=input_ids, **{keyword: trace.cache}, use_cache=True).logits
            ids, gates = recorder.take()
            trace.ids.append(ids)
            trace.gates.append(gates)
            input_ids = logits[:, -1:].argmax(-1)
    return trace


def tokens_message(trace: Trace, step: int, with_kv: bool = True) -> Message:
    """The TOKENS message the main rank sends the shadow before `step` (MainSession._before_forward): the input
    ids and, from step 1 (and `with_kv`), each cache layer's keys and values of the previous step's tokens."""
    tensors = [trace.inputs[step].to("cpu", torch.int64)]
    if step and with_kv:
        start, end = trace.pasts[step - 1], trace.pasts[step]
        for layer in trace.cache.layers:
            tensors += [layer.keys[..., start:end, :], layer.values[..., start:end, :]]
    return Message(Kind.TOKENS, step + 1, 0, tensors, arg=trace.pasts[step])


# ------------------------------------------------------------------------------------------ predictions


class RecordingShadow(Shadow):
    """The shadow rank's own code with its predictions kept instead of sent: {(message step, layer): ids} of its
    ordinary steps and of its speculative ones (the union over its candidate tokens)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ordinary: dict[tuple[int, int], torch.Tensor] = {}
        self.speculative: dict[tuple[int, int], torch.Tensor] = {}

    def _send_prediction(self, layer: int, ids: torch.Tensor) -> None:
        (self.ordinary if self._gathered is None else self.speculative)[(self.step, layer)] = ids


@torch.no_grad()
def shadow_predictions(model, trace: Trace, alignment: str, candidates: int) -> tuple[list, list]:
    """The shadow's predicted ids [step][layer] (the shadow rank's `_run` on the main's messages, its routers
    hooked as `Shadow.serve` hooks them; `alignment` one of ALIGNMENTS), and those of its speculative steps
    [step][layer] (None at the prefill; without re-alignment, the ordinary ones: that shadow's steps do not
    depend on the main's). The speculative steps run every layer (look-ahead = the model's MoE layers), from
    the shadow's `candidates` most likely tokens."""
    speculate = alignment != "none"
    layers = len(trace.ids[0])
    shadow = RecordingShadow(model, SIMULATED_TOPOLOGY, speculate, timeout_s=1.0, idle_timeout_s=1.0,
                             lookahead=layers if speculate else 0, candidates=candidates)
    hooks = [router.register_forward_hook(shadow._routed(layer)) for layer, router in enumerate(shadow.routers)]
    try:
        for step in range(len(trace.inputs)):
            shadow._run(tokens_message(trace, step, with_kv=alignment == "full"))
    finally:
        for hook in hooks:
            hook.remove()
    if shadow.counters["skipped_steps"] or shadow.counters["steps"] != len(trace.inputs):
        raise RuntimeError(f"the simulated shadow did not run every step: {shadow.counters}")
    # tokens_message numbers trace step s as message step s + 1; a speculative prediction for step s is made
    # at the end of step s - 1 and carries step s's number
    ordinary = [[shadow.ordinary[(s + 1, layer)] for layer in range(layers)] for s in range(len(trace.inputs))]
    speculative = [None] + [[shadow.speculative[(s + 1, layer)] for layer in range(layers)] if speculate
                            else ordinary[s] for s in range(1, len(trace.inputs))]
    if alignment == "full":
        print(f"    re-aligned cache: max |shadow - main| over positions 0..{trace.pasts[-1] - 1}: "
              f"{alignment_error(shadow.cache, trace):.3g}", flush=True)
    return ordinary, speculative


def alignment_error(cache, trace: Trace) -> float:
    """The largest difference between the shadow's keys and values and the main's (in the shadow's dtype) at
    the positions the main rank has sent (all but the last step's): 0 where re-alignment works."""
    n, worst = trace.pasts[-1], 0.0
    for mine, main in zip(cache.layers, trace.cache.layers, strict=True):
        for a, b in ((mine.keys, main.keys), (mine.values, main.values)):
            worst = max(worst, float((a[..., :n, :].float() - b[..., :n, :].to(a.dtype).float()).abs().max()))
    return worst


@torch.no_grad()
def single_node_predictions(routers: list[torch.nn.Module], residuals: list[torch.Tensor] | None, trace: Trace,
                            distance: int) -> list[list[torch.Tensor | None]]:
    """Top-k ids [step][layer] of router l on x_{l-d} + res_vec(l-d) + ... + res_vec(l-1) (no residuals:
    next_gate); None for the layers l < d it cannot reach."""
    predictions = []
    for gates in trace.gates:
        row = []
        for layer in range(len(routers)):
            if layer < distance:
                row.append(None)
                continue
            x = gates[layer - distance]
            if residuals is not None:
                x = x + sum(residuals[layer - distance:layer])
            row.append(routing_of(routers[layer](x))[0].to(torch.int64))
        predictions.append(row)
    return predictions


# ----------------------------------------------------------------------------------------------- recall


def token_recall(predicted: torch.Tensor | None, actual: torch.Tensor) -> torch.Tensor:
    """|predicted ∩ actual| / |actual| per token [T] (NaN where nothing is predicted)."""
    if predicted is None:
        return torch.full((actual.shape[0],), math.nan)
    return (actual[:, :, None] == predicted[:, None, :]).any(-1).float().mean(-1)


def token_loads(predicted: torch.Tensor | None, actual: torch.Tensor) -> torch.Tensor:
    """Distinct experts predicted per token over K [T] (what a worker loads for it; NaN where nothing is
    predicted): 1 for a top-k prediction, up to the candidates for a speculative union."""
    if predicted is None:
        return torch.full((actual.shape[0],), math.nan)
    return torch.tensor([row.unique().numel() / actual.shape[1] for row in predicted], dtype=torch.float32)


def recall_cells(predictions: list[list], trace: Trace, steps: range, measure=token_recall) -> torch.Tensor:
    """Recall (or another per-token `measure`) per (token, layer) [tokens of `steps`, L]."""
    return torch.cat([torch.stack([measure(predictions[s][l], trace.ids[s][l])
                                   for l in range(len(trace.ids[s]))], dim=1) for s in steps])


def shadow_cells(ordinary: torch.Tensor, speculative: torch.Tensor, distance: int) -> torch.Tensor:
    """The shadow at look-ahead d: its speculative step for the layers l < d, its ordinary step for the rest."""
    cells = ordinary.clone()
    cells[:, :distance] = speculative[:, :distance]
    return cells


def mean(cells: torch.Tensor) -> float | None:
    value = float(cells.nanmean()) if cells.numel() else math.nan
    return None if math.isnan(value) else value


def summary(predictor: str, phase: str, distance: int | None, cells: torch.Tensor, loads: torch.Tensor) -> dict:
    covered = [l for l in range(cells.shape[1]) if not cells[:, l].isnan().all()]
    split = distance or 0
    return dict(predictor=predictor, phase=phase, distance=distance, recall=mean(cells),
                layers=f"{covered[0]}-{covered[-1]}" if covered else "", cells=int((~cells.isnan()).sum()),
                recall_l_ge_d=mean(cells[:, split:]), recall_l_lt_d=mean(cells[:, :split]) if split else None,
                loads_per_k=mean(loads))


def calibration_ids(tokenizer: CharTokenizer, plays: dict, splits: dict, windows: int, length: int) -> torch.Tensor:
    """`windows` windows [windows, length] spread evenly over the calibration play(s)."""
    ids = split_ids(tokenizer, plays, splits["calibration"])
    stride = (ids.numel() - length) // max(windows, 1)
    return torch.stack([ids[i * stride:i * stride + length] for i in range(windows)])


# ---------------------------------------------------------------------------------------------- section 1


def shadow_rows(args, main_model, trace: Trace, decode: range, prefill: range) -> list[dict]:
    rows = []
    for precision in args.precisions:
        shadow_model = make_shadow(copy.deepcopy(main_model), precision).eval()
        for alignment, suffix in ALIGNMENTS.items():
            name = f"shadow-{precision}{suffix}"
            print(f"  {name} ...", flush=True)
            ordinary, speculative = shadow_predictions(shadow_model, trace, alignment, args.speculative_tokens)
            cells = {part: (recall_cells(predictions, trace, decode),
                            recall_cells(predictions, trace, decode, token_loads))
                     for part, predictions in (("ordinary", ordinary), ("speculative", speculative))}
            rows += [summary(name, "decode", d, *(shadow_cells(o, s, d) for o, s in zip(*cells.values(), strict=True)))
                     for d in args.distances]
            rows.append(summary(name, "prefill", None, recall_cells(ordinary, trace, prefill),
                                recall_cells(ordinary, trace, prefill, token_loads)))
        del shadow_model
    return rows


def single_node_rows(args, main_model, trace: Trace, decode: range, prefill: range, residuals) -> list[dict]:
    rows, routers = [], routers_of(main_model)
    for name, vectors in (("residual", residuals), ("next_gate", None)):
        for d in args.distances:
            predictions = single_node_predictions(routers, vectors, trace, d)
            rows.append(summary(name, "decode", d, recall_cells(predictions, trace, decode),
                                recall_cells(predictions, trace, decode, token_loads)))
            if d == 1:
                rows.append(summary(name, "prefill", d, recall_cells(predictions, trace, prefill),
                                    recall_cells(predictions, trace, prefill, token_loads)))
    return rows


def judge(rows: list[dict]) -> None:
    """The decode rows' targets: a re-aligned shadow, TARGETS[precision]; one without re-alignment, MEASURABLE
    less recall than the re-aligned row of the same precision and distance (not for `same`: its runs are the
    main's). Tokens-only rows and the prefill (where the variants run alike) have none."""
    recall = {(r["predictor"], r["phase"], r["distance"]): r["recall"] for r in rows}
    for row in rows:
        name = row["predictor"]
        if row["phase"] != "decode" or not name.startswith("shadow-"):
            continue
        precision, _, variant = name.removeprefix("shadow-").partition(" ")
        if precision not in TARGETS:
            continue
        if not variant:
            row["target"] = f">= {TARGETS[precision]:.0%}"
            row["met"] = row["recall"] >= TARGETS[precision] - 1e-12
        elif variant == ALIGNMENTS["none"].strip() and precision != "same":
            reference = recall.get((f"shadow-{precision}", "decode", row["distance"]))
            row["target"] = f"re-aligned - this >= {MEASURABLE:.1%}"
            row["met"] = reference is not None and reference - row["recall"] >= MEASURABLE


def recall_section(args) -> list[dict]:
    """Section 1: every predictor's recall, decode steps by distance, and the prefill."""
    training = json.loads((args.checkpoint / "training.json").read_text())
    tokenizer, plays = CharTokenizer.load(args.checkpoint), play_texts()
    prompt_text = split_ids(tokenizer, plays, training["splits"]["evaluation"])
    prompt = prompt_text[args.prompt_offset:args.prompt_offset + args.prompt_length]
    main_model = load_model(args.checkpoint)
    num_layers = len(routers_of(main_model))
    if not all(1 <= d <= num_layers for d in args.distances):
        raise SystemExit(f"--distances must lie in 1..{num_layers} (the model's MoE layers)")
    print(f"main model: fp32, {num_layers} MoE layers; prompt {prompt.numel()} characters of "
          f"{'+'.join(training['splits']['evaluation'])} at {args.prompt_offset}, {args.tokens} decode steps; "
          f"speculative steps from the shadow's {args.speculative_tokens} most likely tokens",
          flush=True)
    trace = decode_main(main_model, prompt, args.tokens)
    print(f"  prompt   {tokenizer.decode(prompt)!r}\n  decoded  "
          f"{tokenizer.decode(torch.cat([t.reshape(-1) for t in trace.inputs[1:]]))!r}", flush=True)
    calibration = calibration_ids(tokenizer, plays, training["splits"], args.calibration_windows,
                                  training["args"]["context"])
    residuals = measure_residuals(main_model, routers_of(main_model), calibration)
    decode, prefill = range(1, len(trace.inputs)), range(0, 1)
    rows = shadow_rows(args, main_model, trace, decode, prefill)
    rows += single_node_rows(args, main_model, trace, decode, prefill, residuals)
    judge(rows)
    print_tables(rows)
    return rows


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def print_tables(rows: list[dict]) -> None:
    header = (f"{'predictor':<26} {'d':>2} {'recall':>8} {'layers':>6} {'l>=d':>8} {'l<d':>8} {'loads/K':>7}  target")
    for phase, title in (("decode", "decode steps (prefill excluded)"),
                         ("prefill", "prefill, every prompt token (shadows: no look-ahead limit)")):
        print(f"\n{title}\n{header}")
        for r in (r for r in rows if r["phase"] == phase):
            target = f"{r['target']}: {'met' if r['met'] else 'MISSED'}" if "target" in r else ""
            print(f"{r['predictor']:<26} {r['distance'] if r['distance'] is not None else '-':>2} "
                  f"{percent(r['recall']):>8} {r['layers']:>6} {percent(r['recall_l_ge_d']):>8} "
                  f"{percent(r['recall_l_lt_d']):>8} {r['loads_per_k'] or math.nan:>7.3f}  {target}")


def write_csv(rows: list[dict], path: str) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0], epilog=__doc__.partition("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="the trained tiny MoE (default: ../shared/models/tiny_shakespeare_moe from the project root)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps (default: %(default)s)")
    p.add_argument("--prompt-length", type=int, default=64, help="prompt characters (default: %(default)s)")
    p.add_argument("--prompt-offset", type=int, default=10_000,
                   help="where the prompt starts in the evaluation play (default: %(default)s)")
    p.add_argument("--distances", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="look-ahead distances in layers (default: %(default)s)")
    p.add_argument("--speculative-tokens", type=int, default=SPECULATIVE_CANDIDATES,
                   help="the shadow's most likely next tokens its speculative steps run from (1: its greedy token)")
    p.add_argument("--precisions", nargs="+", default=["same", "bf16", "int8"],
                   help="shadow precisions; 'same' checks the simulation (default: %(default)s)")
    p.add_argument("--calibration-windows", type=int, default=16,
                   help="windows of the training context length from the calibration play for res_vec "
                        "(default: %(default)s)")
    p.add_argument("--csv", default=None, help="write every row to this CSV file (section 2: NAME.speed.csv)")
    p.add_argument("--sections", nargs="+", choices=["recall", "speed"], default=["recall", "speed"])
    distributed_speed.add_arguments(p)
    args = p.parse_args(argv)
    if args.tokens < 1 or args.prompt_length < 1:
        p.error("--tokens and --prompt-length must be at least 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = recall_section(args) if "recall" in args.sections else []
    if args.csv and rows:
        write_csv(rows, args.csv)
    if "speed" in args.sections:
        speed = distributed_speed.speed_section(args)
        distributed_speed.print_table(speed)
        if args.csv:
            write_csv(speed, str(Path(args.csv).with_suffix(".speed.csv")))
        rows += speed
    return rows


if __name__ == "__main__":
    main()

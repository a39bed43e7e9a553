"""Benchmark: end-to-end prefill and decode of offloaded MoE models, every placement policy in one run.

# B batch, P prompt tokens, N decode steps, L MoE layers, E experts, K top-k, H hidden, I intermediate

    python benchmarks/bench_e2e.py                       # CUDA when available, else the emulated accelerator
    python benchmarks/bench_e2e.py --device emulated --steps 4
    python benchmarks/bench_e2e.py --models mixtral --budgets 0.5 --policies dali layerwise threshold --batches 8

Models: Mixtral-8x7B (E=8, K=2, H=4096, I=14336) and Qwen3-30B-A3B (E=128, K=8, H=2048, I=768) shapes
with fewer layers (--layers, default 4), random weights, built from transformers configs (no downloads),
bf16 on CUDA. On the emulated accelerator (the CPU test double of the GPU) the defaults shrink to H=256,
I=512 / 128, 2 layers, fp32 and fewer decode steps, so the run fits a few minutes on 2 cores: there the
timings mean nothing, the counters (hits, copies, CPU/GPU split) and the token checks do.

Rows, per model: `all_on_gpu` (CUDA: the whole model on the device with transformers' grouped_mm experts;
emulated: offload with a budget for every expert and policy lru, which then always hits), then for each
expert budget (a fraction of all L*E experts, plus K staging slots, in bytes) every policy of POLICIES
with the default profiled cost model (`offload` measures it on first use and stores it).

Per row and batch B, a trial is a prefill of [B, P] into a fresh KV cache (timed: prefill tokens/s =
B*P / seconds), then N greedy decode steps of [B, 1] (timed: tokens/s per sequence = N / seconds, as in
the DALI paper). Median over --repeats trials after --warmup trials; the caches of stateful policies stay
warm across trials, as in a serving loop; torch.cuda.synchronize around every timed region. Counters are
deltas of `offload_stats(model)["total"]` over the timed trials.

Correctness first: every trial's first --check-steps greedy tokens must equal the reference's (CUDA: the
all_on_gpu model; emulated: the eager model before offload). A differing token is accepted only where the
reference itself nearly ties (see `compare_tokens`); the rest of that sequence then legitimately diverges
and is not compared. Any other mismatch, or an error, prints FAIL and the run exits non-zero.
Prints a table (ratios against layerwise at the same budget), writes a CSV, and checks the GPU targets.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

import dali_compile
from dali_compile.experts_interface import spec_of_module
from dali_compile.hf_compat import cache_keyword
from dali_compile.offload import experts_modules
from dali_compile.runtime import cpu_extension
from dali_compile.runtime.expert_cache import expert_bytes
from dali_compile.runtime.policies import POLICIES

REFERENCE = "all_on_gpu"
BASELINE = "layerwise"  # the ratio columns divide by this policy's row at the same budget
# A token may differ from the reference's only where the reference's logit for it is within this fraction
# of the row's largest |logit| of its own best. fp32: summation order only. bf16: dali keeps fp32 inside
# each expert while transformers' grouped_mm rounds intermediates to bf16 (tests/helpers.py measures up to
# 4% of the largest logit between the two on tiny models).
TIE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
# (policy, metric, factor over the other policy) at the half budget, largest batch: the GPU run's goals.
TARGETS = (("decode", BASELINE, 2.0), ("decode", "threshold", 1.3), ("decode", "cache_cpu_miss", 1.3),
           ("prefill", BASELINE, 2.0))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    name: str
    config_class: str
    hidden: int  # H
    intermediate: int  # I, one expert's
    experts: int  # E
    top_k: int  # K
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int


FULL = {
    "mixtral": ModelShape("mixtral", "MixtralConfig", 4096, 14336, 8, 2, 32, 8, 128, 32000, 4),
    "qwen3": ModelShape("qwen3", "Qwen3MoeConfig", 2048, 768, 128, 8, 32, 4, 128, 32000, 4),
}
# Same E and K (so routing, caches and budgets behave alike), small enough for the emulated run on 2 cores.
REDUCED = {
    "mixtral": dataclasses.replace(FULL["mixtral"], hidden=256, intermediate=512, heads=8, kv_heads=2, head_dim=32,
                                   vocab=512, layers=2),
    "qwen3": dataclasses.replace(FULL["qwen3"], hidden=256, intermediate=128, heads=8, kv_heads=2, head_dim=32,
                                 vocab=512, layers=2),
}


@dataclass
class Phase:
    """One phase (prefill or decode) at one batch size, over the timed trials."""

    seconds: list[float] = field(default_factory=list)
    forwards: int = 0  # model forwards timed (decode: one per step)
    counters: dict | None = None  # summed deltas of offload_stats(model)["total"]; None when not offloaded

    def add_counters(self, delta: dict | None) -> None:
        if delta is not None:
            self.counters = delta if self.counters is None else {k: self.counters[k] + delta[k] for k in delta}


@dataclass
class Row:
    model: str
    budget: str  # "25%", "50%", "all"
    budget_bytes: int
    policy: str
    prefill_tok_s: dict[int, float] = field(default_factory=dict)  # batch -> B*P / median seconds
    decode_tok_s: dict[int, float] = field(default_factory=dict)  # batch -> N / median seconds, per sequence
    phases: dict[tuple[str, int], Phase] = field(default_factory=dict)
    tokens: str = ""  # "ok", "ok~n" (n reference ties), "ref", "FAIL", "ERROR"
    failure: str = ""

    @property
    def failed(self) -> bool:
        return self.tokens in ("FAIL", "ERROR")


@dataclass
class Reference:
    """Per batch: the greedy tokens [B, S] and the last-token logits [B, S, V] of the first S steps."""

    tokens: dict[int, torch.Tensor]
    logits: dict[int, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Models and budgets


def build_model(shape: ModelShape, dtype: torch.dtype, device: str):
    """A random-weight causal LM of `shape`, in eval mode, initialised directly on `device` (fast on a GPU)."""
    import transformers

    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                  max_position_embeddings=4096, tie_word_embeddings=False,
                  # unit gain per projection: activations neither vanish nor saturate at any H, so routing
                  # and greedy tokens depend on every layer
                  initializer_range=shape.hidden**-0.5)
    if shape.config_class == "MixtralConfig":
        family = dict(intermediate_size=shape.intermediate, num_local_experts=shape.experts,
                      num_experts_per_tok=shape.top_k)
    else:
        family = dict(intermediate_size=4 * shape.intermediate, moe_intermediate_size=shape.intermediate,
                      num_experts=shape.experts, num_experts_per_tok=shape.top_k, norm_topk_prob=True)
    config = getattr(transformers, shape.config_class)(**common, **family)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def expert_geometry(model) -> tuple[int, int, int, int]:
    """(bytes of one expert slot, MoE layers L, experts per layer E, top-k K)."""
    experts = [module for _, module in experts_modules(model)]
    spec = spec_of_module(experts[0])
    return expert_bytes(spec), len(experts), spec.num_experts, model.config.num_experts_per_tok


def budget_bytes(geometry, fraction: float) -> int:
    """`fraction` of all L*E experts (rounded to whole experts), plus K staging slots."""
    slot, layers, experts, top_k = geometry
    return slot * (round(fraction * layers * experts) + top_k)


def make_prompts(batches, prompt_len: int, vocab: int, device) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {b: torch.randint(0, vocab, (b, prompt_len), generator=generator).to(device) for b in batches}


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Trial:
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor  # [B, N + 1] greedy tokens (the first from the prefill), on the host
    logits: torch.Tensor  # [B, S, V] fp32 last-token logits of the first S = keep steps, on the host
    prefill_delta: dict | None
    decode_delta: dict | None


def counter_delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None:
        return None
    return {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float)) and k != "hit_rate"}


@torch.no_grad()
def run_trial(forward, prompt: torch.Tensor, steps: int, keep: int, sync, snapshot) -> Trial:
    """Prefill `prompt` [B, P] into a fresh cache, then `steps` greedy decode steps of [B, 1]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    before = snapshot()
    sync()
    start = time.perf_counter()
    keyword = cache_keyword(forward)
    out = forward(input_ids=prompt, **{keyword: cache}, use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - start
    middle = snapshot()
    logits = [out.logits[:, -1]]  # kept on the device: no host sync inside the timed loop
    token = logits[0].argmax(-1, keepdim=True)
    tokens = [token]
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = forward(input_ids=token, **{keyword: cache}, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if len(logits) < keep:
            logits.append(out.logits[:, -1])
    sync()
    decode_s = time.perf_counter() - start
    after = snapshot()
    return Trial(prefill_s, decode_s, torch.cat(tokens, dim=1).cpu(), torch.stack(logits, dim=1).float().cpu(),
                 counter_delta(before, middle), counter_delta(middle, after))


def compare_tokens(got: torch.Tensor, want: torch.Tensor, want_logits: torch.Tensor, rtol: float) -> tuple[int, str]:
    """(reference ties accepted, failure message or ""): `got` and `want` are [B, S] greedy tokens.

    A differing token passes only where the reference nearly ties: its logit for `got` is within
    rtol * max|logit| of its logit for `want`. Later tokens of that sequence are not compared."""
    ties = 0
    for b in range(want.shape[0]):
        for s in range(want.shape[1]):
            ours, theirs = int(got[b, s]), int(want[b, s])
            if ours == theirs:
                continue
            row = want_logits[b, s]
            margin = float(row[theirs] - row[ours])
            scale = float(row.abs().max())
            if margin > rtol * scale:
                return ties, (f"sequence {b}, step {s}: token {ours}, reference {theirs} (reference logits "
                              f"{float(row[theirs]):.4g} vs {float(row[ours]):.4g}, tie tolerance "
                              f"{rtol * scale:.3g})")
            ties += 1
            break
    return ties, ""


def time_row(row: Row, forward, prompts, args, sync, snapshot, reference: Reference | None) -> Reference:
    """Fill `row` with rates and counters for every batch; check tokens against `reference` (None: this row
    is the reference). Returns the reference tokens and logits this row produced."""
    made = Reference({}, {})
    check = min(args.check_steps, args.steps + 1)
    ties, failure = 0, ""
    for batch, prompt in prompts.items():
        prefill, decode = Phase(), Phase()
        for index in range(args.warmup + args.repeats):
            trial = run_trial(forward, prompt, args.steps, check, sync, snapshot)
            if index == 0:
                made.tokens[batch], made.logits[batch] = trial.tokens[:, :check], trial.logits
            if reference is not None and not failure:
                found, failure = compare_tokens(trial.tokens[:, :check], reference.tokens[batch],
                                                reference.logits[batch], TIE_RTOL[args.dtype])
                ties += found if index == 0 else 0
                failure = f"batch {batch}, trial {index}: {failure}" if failure else ""
            if index >= args.warmup:
                prefill.seconds.append(trial.prefill_s)
                prefill.forwards += 1
                prefill.add_counters(trial.prefill_delta)
                decode.seconds.append(trial.decode_s)
                decode.forwards += args.steps
                decode.add_counters(trial.decode_delta)
        row.phases[("prefill", batch)], row.phases[("decode", batch)] = prefill, decode
        row.prefill_tok_s[batch] = batch * prompt.shape[1] / statistics.median(prefill.seconds)
        row.decode_tok_s[batch] = args.steps / statistics.median(decode.seconds)
    row.tokens = "ref" if reference is None else ("FAIL" if failure else ("ok" if not ties else f"ok~{ties}"))
    row.failure = failure
    return made


# ---------------------------------------------------------------------------------------------------
# Rows


def compiled(fn, args):
    return torch.compile(fn, backend="dali", dynamic=True) if args.compile else fn


def run_offloaded(model, shape: ModelShape, budget: str, nbytes: int, policy: str, prompts, args,
                  reference: Reference, label: str = "") -> Row:
    """Offload `model` with `policy` and `nbytes` of expert memory, time it, release it."""
    row = Row(shape.name, budget, nbytes, label or policy)
    offloaded = False
    started = time.perf_counter()
    try:
        dali_compile.offload(model, device=args.device, expert_memory=nbytes, policy=policy)
        offloaded = True
        sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
        time_row(row, compiled(model.forward, args), prompts, args, sync,
                 lambda: dali_compile.offload_stats(model)["total"], reference)
    except Exception as error:  # a failing policy is a reported failure, the other rows still run
        row.tokens, row.failure = "ERROR", f"{type(error).__name__}: {error}"
        traceback.print_exc()
    finally:
        if offloaded:
            dali_compile.release(model)
        if args.compile:
            torch._dynamo.reset()  # compiled graphs hold this runtime's layer handles as constants
        free_memory(args.device == "cuda")
    print_progress(row, time.perf_counter() - started)
    return row


def reference_rows(model, shape: ModelShape, geometry, prompts, args) -> tuple[Reference, list[Row]]:
    """CUDA: the whole model on the device is both the all_on_gpu row and the reference; it then goes back to
    the host for offloading. Emulated: the eager model on the CPU gives the reference (untimed), and the
    all_on_gpu row is an lru offload with room for every expert."""
    if args.device == "cuda":
        slot, layers, experts, _ = geometry
        row = Row(shape.name, "all", slot * layers * experts, REFERENCE)
        started = time.perf_counter()
        model.to("cuda")
        reference = time_row(row, model, prompts, args, torch.cuda.synchronize, lambda: None, None)
        print_progress(row, time.perf_counter() - started)
        model.to("cpu")
        free_memory(True)
        return reference, [row]
    check = min(args.check_steps, args.steps + 1)
    trials = {b: run_trial(model, p, check - 1, check, lambda: None, lambda: None) for b, p in prompts.items()}
    reference = Reference({b: t.tokens for b, t in trials.items()}, {b: t.logits for b, t in trials.items()})
    nbytes = budget_bytes(geometry, 1.0)
    return reference, [run_offloaded(model, shape, "all", nbytes, "lru", prompts, args, reference, REFERENCE)]


def bench_model(shape: ModelShape, args, done: list[Row]) -> list[Row]:
    """Every row of one model; the CSV is rewritten after each budget (`done`: earlier models' rows)."""
    cuda = args.device == "cuda"
    started = time.perf_counter()
    model = build_model(shape, args.dtype, "cuda" if cuda else "cpu")
    geometry = expert_geometry(model)
    slot, layers, experts, top_k = geometry
    print(f"\n{shape.name}: H={shape.hidden} I={shape.intermediate} E={experts} K={top_k} L={layers} "
          f"vocab={shape.vocab}, {slot / 2**20:.2f} MiB per expert, {layers * experts * slot / 2**30:.2f} GiB of "
          f"experts (built in {time.perf_counter() - started:.1f} s)", flush=True)
    prompts = make_prompts(args.batches, args.prompt_len, shape.vocab, "cuda" if cuda else "cpu")
    reference, rows = reference_rows(model, shape, geometry, prompts, args)
    for fraction in args.budgets:
        nbytes = budget_bytes(geometry, fraction)
        label = f"{fraction:.0%}"
        print(f"  budget {label}: {nbytes / 2**30:.3f} GiB = {nbytes // slot} slots "
              f"({round(fraction * layers * experts)} experts + {top_k} staging)", flush=True)
        for policy in args.policies:
            rows.append(run_offloaded(model, shape, label, nbytes, policy, prompts, args, reference))
        write_csv(done + rows, args)
    del model
    free_memory(cuda)
    return rows


# ---------------------------------------------------------------------------------------------------
# Report


def derived(phase: Phase | None) -> dict:
    """Hit rate, copies per forward (decode: per step), experts per MoE layer step on the CPU and GPU."""
    c = phase.counters if phase is not None else None
    if not c:
        return {"hit_rate": math.nan, "copies_per_step": math.nan, "cpu_experts": math.nan, "gpu_experts": math.nan}
    looked_up, layer_steps = c["hits"] + c["misses"], max(c["steps"], 1)
    return {"hit_rate": c["hits"] / looked_up if looked_up else math.nan,
            "copies_per_step": c["copies"] / max(phase.forwards, 1),
            "cpu_experts": c["experts_cpu"] / layer_steps, "gpu_experts": c["experts_gpu"] / layer_steps}


def ratio(rows: list[Row], row: Row, metric: str, batch: int, over: str = BASELINE) -> float:
    """row's tokens/s over the `over` policy's at the same model and budget (nan when absent)."""
    base = next((r for r in rows if (r.model, r.budget, r.policy) == (row.model, row.budget, over)), None)
    ours, theirs = (getattr(r, f"{metric}_tok_s").get(batch, math.nan) if r else math.nan for r in (row, base))
    return ours / theirs if theirs and not math.isnan(theirs) else math.nan


def fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec) + suffix


def print_progress(row: Row, seconds: float) -> None:
    rates = " ".join(f"prefill b{b} {row.prefill_tok_s[b]:.1f} decode b{b} {row.decode_tok_s[b]:.2f}"
                     for b in row.prefill_tok_s)
    print(f"    {row.budget:>4} {row.policy:<15} {rates}  tokens {row.tokens}  ({seconds:.1f} s)", flush=True)
    if row.failure:
        print(f"    FAIL {row.model} {row.budget} {row.policy}: {row.failure}", flush=True)


def print_table(rows: list[Row], args) -> None:
    big = max(args.batches)
    rates = "".join(f" {'pre b' + str(b):>9}" for b in args.batches) + "".join(
        f" {'dec b' + str(b):>8}" for b in args.batches)
    print(f"\nprefill tok/s = B*{args.prompt_len}/s; decode tok/s per sequence = {args.steps}/s; ratios and "
          f"counters at batch {big} (counters: the timed decode steps; cpu/gpu: experts per MoE layer step)")
    print(f"{'model':<8} {'budget':>6} {'policy':<15}{rates} {'dec/lw':>7} {'pre/lw':>7} {'hit%':>6} "
          f"{'copies/st':>9} {'cpu/gpu exp':>11} {'tokens':>6}")
    for row in rows:
        d = derived(row.phases.get(("decode", big)))
        values = "".join(f" {fmt(row.prefill_tok_s.get(b, math.nan), '9.1f')}" for b in args.batches) + "".join(
            f" {fmt(row.decode_tok_s.get(b, math.nan), '8.2f')}" for b in args.batches)
        split = "-" if math.isnan(d["cpu_experts"]) else f"{d['cpu_experts']:.1f}/{d['gpu_experts']:.1f}"
        print(f"{row.model:<8} {row.budget:>6} {row.policy:<15}{values} "
              f"{fmt(ratio(rows, row, 'decode', big), '.2f', 'x'):>7} "
              f"{fmt(ratio(rows, row, 'prefill', big), '.2f', 'x'):>7} "
              f"{fmt(100 * d['hit_rate'], '6.1f'):>6} {fmt(d['copies_per_step'], '9.2f'):>9} {split:>11} "
              f"{row.tokens:>6}")


def csv_record(row: Row, rows: list[Row], args) -> dict:
    record = {"model": row.model, "device": args.device, "dtype": str(args.dtype).removeprefix("torch."),
              "compile": args.compile, "budget": row.budget, "budget_bytes": row.budget_bytes, "policy": row.policy,
              "tokens": row.tokens, "failure": row.failure}
    for b in args.batches:
        record[f"prefill_tok_s_b{b}"] = row.prefill_tok_s.get(b, math.nan)
        record[f"decode_tok_s_per_seq_b{b}"] = row.decode_tok_s.get(b, math.nan)
        for metric in ("prefill", "decode"):
            record[f"{metric}_vs_{BASELINE}_b{b}"] = ratio(rows, row, metric, b)
            for name, value in derived(row.phases.get((metric, b))).items():
                record[f"{metric}_{name}_b{b}"] = value
    return record


def write_csv(rows: list[Row], args) -> None:
    records = [csv_record(r, rows, args) for r in rows]
    if records:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)


def print_targets(rows: list[Row], args) -> None:
    note = "" if args.device == "cuda" else " (emulated accelerator: NOT meaningful, timings mean nothing)"
    print(f"\ntargets: dali at the 50% budget, batch 8{note}")
    for model in dict.fromkeys(r.model for r in rows):
        dali = next((r for r in rows if (r.model, r.budget, r.policy) == (model, "50%", "dali")), None)
        for metric, other, factor in TARGETS:
            value = ratio(rows, dali, metric, 8, over=other) if dali else math.nan
            verdict = "SKIP" if math.isnan(value) else ("PASS" if value >= factor else "MISS")
            print(f"  {verdict} {model} dali {metric} >= {factor}x {other}: {fmt(value, '.2f', 'x')}"
                  + (" (not measured)" if verdict == "SKIP" else ""))


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "emulated"], default="cuda" if cuda else "emulated")
    parser.add_argument("--models", nargs="+", choices=list(FULL), default=list(FULL))
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5],
                        help="fractions of all experts that fit the expert memory, plus K staging slots")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per trial (cuda 16, emulated 6)")
    parser.add_argument("--check-steps", type=int, default=4, help="greedy tokens compared with the reference")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed trials (cuda 3, emulated 2)")
    parser.add_argument("--layers", type=int, default=None, help="layers of every model (cuda 4, emulated 2)")
    parser.add_argument("--hidden", type=int, default=None, help="H of every model (default: real, emulated 256)")
    parser.add_argument("--intermediate", type=int, default=None, help="I of every model's experts")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (cuda 32000, emulated 512)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="cuda: bf16, emulated: fp32")
    parser.add_argument("--compile", action="store_true", help="wrap forward in torch.compile(backend='dali')")
    parser.add_argument("--csv", default="bench_e2e.csv", help="output CSV (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: torch.cuda is not available here (use --device emulated)")
    emulated = args.device == "emulated"
    args.steps = args.steps if args.steps is not None else (6 if emulated else 16)
    args.repeats = args.repeats if args.repeats is not None else (2 if emulated else 3)
    args.dtype = DTYPES[args.dtype or ("fp32" if emulated else "bf16")]
    overrides = {k: v for k, v in (("layers", args.layers), ("hidden", args.hidden),
                                   ("intermediate", args.intermediate), ("vocab", args.vocab)) if v is not None}
    args.shapes = [dataclasses.replace((REDUCED if emulated else FULL)[m], **overrides) for m in args.models]
    if min(args.steps, args.repeats, args.check_steps, args.prompt_len, *args.batches) < 1 or args.warmup < 0:
        parser.error("steps, repeats, check-steps, prompt-len and batches must be >= 1, warmup >= 0")
    return args


def print_header(args) -> None:
    if args.device == "emulated":
        print("=" * 100)
        print("emulated accelerator: timings mean nothing, counters do (CPU test double of the GPU; reduced sizes)")
        print("=" * 100)
    else:
        print(f"device: {torch.cuda.get_device_name()}")
    threads = cpu_extension.get_num_threads() if cpu_extension.cpu_extension_available() else 0
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, CPU expert runtime "
          f"{threads} threads ({cpu_extension.cpu_isa()}), torch {torch.get_num_threads()} threads")
    print(f"prompt {args.prompt_len} tokens, batches {args.batches}, {args.steps} decode steps, {args.warmup} warm-up "
          f"+ {args.repeats} timed trials (median), first {args.check_steps} greedy tokens checked against "
          f"{'all_on_gpu' if args.device == 'cuda' else 'the eager model'}")
    print("torch.compile(backend='dali') on the offloaded models' forward (the CUDA all_on_gpu row stays eager)"
          if args.compile else "eager (no torch.compile; --compile to wrap forward in torch.compile(backend='dali'))")


def main(argv=None) -> int:
    args = parse_args(argv)
    print_header(args)
    rows: list[Row] = []
    for shape in args.shapes:
        rows += bench_model(shape, args, rows)
    print_table(rows, args)
    write_csv(rows, args)
    print(f"wrote {args.csv}")
    print_targets(rows, args)
    failures = [r for r in rows if r.failed]
    for r in failures:
        print(f"FAIL {r.model} {r.budget} {r.policy}: {r.failure}")
    if failures:
        print(f"FAIL: {len(failures)} of {len(rows)} runs do not match the reference (correctness first)")
        return 1
    print(f"all {len(rows)} runs match the reference tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: whole decode steps and prefills of MoE models on the CPU, eager and inductor against the dali backend.

# B batch, S tokens already in the KV cache, P prompt tokens, E experts, K top-k, H hidden, I one expert's intermediate

    python benchmarks/bench_decode.py                    # all models, bf16 fp32, B 1 4, S 32 512, P 64 512
    python benchmarks/bench_decode.py --models qwen3 --dtypes bf16 --batch 1 --kv 512 --prefill 512
    python benchmarks/bench_decode.py --paths eager dali --repeats 9 --csv /tmp/decode.csv --no-plot
    python benchmarks/bench_decode.py --models tiny --paths eager dali --dali-no-inductor   # smoke run (the test's)

Models (SHAPES): real shapes, 1-2 layers, vocab 512, random weights (default init), from transformers configs;
`tiny` is for smoke runs. Paths share one model's parameter tensors; compiled ones use dynamic=False:
eager (transformers' "eager" experts loop, not compiled), inductor-grouped / inductor-batched (backend inductor,
grouped_mm / batched_mm experts), dali (backend dali, grouped_mm experts rewritten into dali::moe_hybrid),
dali-int8dense / dali-int4dense (dali on a copy after `dali_compile.quantize(model, dense=...)`: the attention
projections and lm_head in int8 / int4 g32), dali-int8 / dali-int4 (the routed experts too: quantize(experts=fmt,
dense=fmt)); a quantized path's floor counts the bytes it reads, codes and scales, with eager's routing.
Inductor's C++ kernels get `cpp.enable_kernel_profile` (nanoseconds per call) so the profiler sees them as ops.

Decode step: model(input_ids [B, 1], cache of S tokens, use_cache=True, logits_to_keep=1); the cache comes from
one eager prefill of S + 1 tokens cropped to S, each path steps on its own copy, cropped back to S after every
step (untimed). --cache static: a StaticCache of S + 64 positions filled with S tokens, each step at
cache_position S (transformers masks the unfilled positions; nothing to undo between steps).
Prefill: B=1, P tokens, an empty DynamicCache. A path's first call (it compiles) is its check:
max |logits - eager's| / max |eager's| (bf16 rounding: reported, not judged). Then --warmup calls, then
--repeats rounds interleaving the paths (drifting load hits all alike): each runs a block of up to 4 steps,
50 ms of sleep between blocks so OpenMP threads go quiet, a block of short steps after one untimed step (as in a
decode loop, where steps run back to back: see BLOCK_WARM_SECONDS); the median per step, and the 1-minute load average.
vs_best_torch = the best of eager / inductor ms / the path's ms. With dali, "dali-pool" is the same compiled
model with its synchronous kernels on the runtime's own pool instead of ATen's threads (one thread budget off);
"dali-pywrapper" is dali with inductor's Python wrapper (option cpp_wrapper=False).
Floor (decode), timed in the same rounds by `cpu_extension.tensor_reader`: the weight bytes a step reads, i.e.
every parameter but the experts and the embedding table, the tokens' embedding rows, and per MoE layer the
distinct experts routed to (pre-hooks on the experts modules in eager's check). floor = floor_ms / ms.
Breakdown of dali's decode step, from --profile-steps profiled steps after the timed rounds: top-level ops
(operators or inductor kernels with no operator above; annotations such as "Torch-Compiled Region" are seen
through) grouped as experts (dali::moe_hybrid, dali::cpu_experts*), dense (dali::cpu_linear, aten::mm, addmm,
linear, matmul, bmm), attention (scaled_dot_product, attention or softmax in the name: the router's softmax
too), other; overhead = wall time minus all top-level ops (Python, dynamo guards, graph glue; the profiler's own
cost included). Fixed cost (dali's overhead share): the dali step of the same structure (layers, experts, top-k,
heads up to 4, vocab) with every width cut to a few dozen, timed in the same rounds: all a step costs beside
reading weights (dynamo's guards, transformers' and the graph's Python, kernel calls, attention, glue), as a share
of dali's step. torch.compile's own call: the full-size model compiled with a backend that replays the graph's first
outputs (`replaying`), timed in the same rounds: dynamo's guards, its frame and the output's reconstruction, what
any backend's step costs before its graph runs (the part of the fixed cost no backend can cut). Fixed cost after a
weight stream: the same tiny step, each one right after reading EVICT_BYTES (untimed), as in a real step, whose
work outside the kernels runs on the caches the weights just streamed through (see after_streaming).
Prefill GFLOP/s counts matmuls only (attention scores and values ignored): 2 * rows * in * out per 2-D weight
but the embedding (LM head: 1 row) + 2 * P * K * 3 * H * I for the experts; gemm = torch.mm of 2048x2048 fp32
matrices in the same rounds. Prints tables, writes a CSV and, when matplotlib imports, a PNG.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import gc
import math
import os
import statistics
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import transformers
from step_profile import BREAKDOWN, breakdown  # the sibling module
from transformers import DynamicCache, StaticCache

import dali_compile
from dali_compile.hf_compat import cache_keyword
from dali_compile.runtime import cpu_extension

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# path -> (experts implementation, torch.compile backend or None for eager)
PATHS = {
    "eager": ("eager", None),
    "inductor-grouped": ("grouped_mm", "inductor"),
    "inductor-batched": ("batched_mm", "inductor"),
    "dali": ("grouped_mm", "dali"),
    # dali without inductor's C++ wrapper (option cpp_wrapper=False): the profiler sees inductor's kernels only
    # when they are called from Python, so dali's breakdown is taken on this one (see breakdown)
    "dali-pywrapper": ("grouped_mm", "dali-pywrapper"),
    # dali on a copy whose dense linears (attention projections, lm_head; routers stay) are quantized
    "dali-int8dense": ("grouped_mm", "dali"),
    "dali-int4dense": ("grouped_mm", "dali"),
    # ... and whose routed experts are quantized too
    "dali-int8": ("grouped_mm", "dali"),
    "dali-int4": ("grouped_mm", "dali"),
}
QUANTIZED = {  # path -> dali_compile.quantize's arguments
    "dali-int8dense": dict(dense="int8"),
    "dali-int4dense": dict(dense="int4"),
    "dali-int8": dict(experts="int8", dense="int8"),
    "dali-int4": dict(experts="int4", dense="int4"),
}
TORCH_PATHS = ("eager", "inductor-grouped", "inductor-batched")
STATIC_HEADROOM = 64  # --cache static: positions past the prompt (a generation of 64 new tokens)
BLOCK = 4  # steps back to back per path and round (fewer when a step takes over BLOCK_SECONDS / BLOCK)
BLOCK_SECONDS = 0.25
COOLDOWN_S = 0.005  # between blocks: OpenMP's threads and our pool (each spins about 1 ms) go quiet
# A block of short steps starts with untimed ones until this much time has passed: right after the pause a step runs
# on a vCPU that just woke and on caches the other paths emptied (on the 2-core machine a 1.2 ms pure-Python loop
# runs 27% slower right after a 50 ms sleep and needs 2-3 ms to get back to speed; a tiny decode step takes 2.5,
# 1.4, 1.05, 0.95, 0.86 ms in a row, 0.7 back to back), while a decode loop runs its steps back to back. Blocks of
# one long step (prefill) get none: there the first milliseconds are noise.
BLOCK_WARM_SECONDS = 0.005
GEMM_N = 2048
# Read before each step of the fixed-cost model's "after a weight stream" timing: 32x the 2 MiB L2 of the 2-core
# machine (its tiny step took 0.68-0.77 ms back to back and 1.36-1.40 ms right after reading 16 to 272 MB).
EVICT_BYTES = 64 << 20
NAN = float("nan")


@dataclass(frozen=True)
class Shape:
    name: str
    config_class: str
    hidden: int  # H
    intermediate: int  # I, one expert's
    experts: int  # E
    top_k: int  # K
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int = 512

    def config(self):
        family = {
            "OlmoeConfig": dict(intermediate_size=self.intermediate, num_experts=self.experts),
            "Qwen3MoeConfig": dict(intermediate_size=self.intermediate, moe_intermediate_size=self.intermediate,
                                   num_experts=self.experts, norm_topk_prob=True),
            "MixtralConfig": dict(intermediate_size=self.intermediate, num_local_experts=self.experts),
        }[self.config_class]
        return getattr(transformers, self.config_class)(
            vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            num_experts_per_tok=self.top_k, tie_word_embeddings=False, max_position_embeddings=4096,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, **family)


SHAPES = {
    "olmoe": Shape("olmoe", "OlmoeConfig", 2048, 1024, 64, 8, 16, 16, 128, 2),
    "qwen3": Shape("qwen3", "Qwen3MoeConfig", 2048, 768, 128, 8, 32, 4, 128, 2),
    "mixtral": Shape("mixtral", "MixtralConfig", 4096, 14336, 8, 2, 32, 8, 128, 1),
    "tiny": Shape("tiny", "Qwen3MoeConfig", 64, 32, 8, 2, 4, 2, 16, 2),  # smoke runs only
}
DEFAULT_MODELS = ("olmoe", "qwen3", "mixtral")


@dataclass(frozen=True)
class Row:
    phase: str  # "decode" or "prefill"
    model: str
    dtype: str
    batch: int
    kv: int  # decode: tokens in the cache; prefill: 0
    prompt: int  # prefill: prompt tokens; decode: 0
    path: str
    experts_impl: str
    ms: float  # median per step
    vs_best_torch: float  # best torch path's ms / ms
    max_rel_err: float  # last-token logits against eager's
    load: float  # 1-minute load average when the point finished
    floor_ms: float = NAN  # decode: reading the step's weight bytes once, same rounds
    floor_fraction: float = NAN  # floor_ms / ms
    floor_mb: float = NAN
    gflop_s: float = NAN  # prefill: matmul FLOPs / time
    gemm_gflop_s: float = NAN  # prefill: torch.mm 2048^3 fp32, same rounds
    gemm_fraction: float = NAN  # gflop_s / gemm_gflop_s
    experts_ms: float = NAN  # dali decode rows: the profiled breakdown, ms per step
    dense_ms: float = NAN
    attention_ms: float = NAN
    other_ms: float = NAN
    overhead_ms: float = NAN
    profiled_ms: float = NAN  # wall time of a profiled step
    fixed_ms: float = NAN  # dali rows: the step of the same structure at tiny widths, same rounds
    overhead_share: float = NAN  # fixed_ms / ms
    fixed_cold_ms: float = NAN  # dali rows: that step right after reading EVICT_BYTES, same rounds
    fixed_cold_share: float = NAN  # fixed_cold_ms / ms
    entry_ms: float = NAN  # dali rows: torch.compile's own call (the model under `replaying`), same rounds
    entry_share: float = NAN  # entry_ms / ms


@dataclass(frozen=True)
class Timed:
    step: Callable[[], object]  # the timed call
    reset: Callable[[], None] = lambda: None  # untimed, after every call


# ---------------------------------------------------------------------------------------------------
# Models and paths


def experts_modules(model) -> list[torch.nn.Module]:
    """Modules owning stacked 3-D expert weights (transformers' experts modules)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter) and m.down_proj.dim() == 3]


def fixed_cost_shape(shape: Shape) -> Shape:
    """The same model structure with every width cut to a few dozen: its step costs what a step costs beside
    reading weights."""
    return dataclasses.replace(shape, hidden=64, intermediate=32, heads=min(shape.heads, 4),
                               kv_heads=min(shape.kv_heads, 4), head_dim=16)


def build_base(shape: Shape, dtype: torch.dtype):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(shape.config(), dtype=dtype)
    return model.eval().requires_grad_(False)


def set_experts(model, implementation: str) -> str:
    """The experts implementation actually in use (the config's default where `implementation` is unknown)."""
    try:
        model.set_experts_implementation(implementation)
    except (KeyError, ValueError) as error:
        print(f"experts implementation {implementation!r} unavailable ({error}); using the default")
    return model.config._experts_implementation


def compiled_alone(model, name: str, **compile_kwargs) -> Callable:
    """torch.compile(model, dynamic=False, **compile_kwargs) with a dynamo cache of its own. Dynamo keeps its
    compiled graphs per code object, and every transformers model's forward is the same decorator function, so all
    paths (and every shape each one compiled) would share one chain of guarded entries: a step then first fails the
    guards of every entry compiled after its own (about 0.15 ms each here) and, past dynamo's recompile limit (8),
    silently runs eagerly. A user's one model has one or two entries; a call through a function with its own code
    object gives each path just its own. `_orig_mod` is the model, as on torch.compile's wrapper."""

    def forward(*args, **kwargs):
        return model(*args, **kwargs)

    own_code = types.FunctionType(forward.__code__.replace(co_name=f"forward_{name.replace('-', '_')}"),
                                  forward.__globals__, closure=forward.__closure__)
    compiled = torch.compile(own_code, dynamic=False, **compile_kwargs)
    compiled._orig_mod = model
    return compiled


def replaying(gm: torch.fx.GraphModule, example_inputs) -> Callable:
    """A torch.compile backend whose compiled graph runs once and then returns those first outputs: a step through
    it costs what torch.compile itself costs per call (guards, frame, the outputs' reconstruction)."""
    saved = []

    def run(*args):
        if not saved:
            saved.append(gm(*args))
        return saved[0]

    return run


def torch_entry(base) -> Callable:
    """The model compiled with `replaying` (dali's experts implementation before the rewrite: grouped_mm)."""
    model = copy.deepcopy(base, memo={id(t): t for t in (*base.parameters(), *base.buffers())})
    set_experts(model, PATHS["dali"][0])
    return compiled_alone(model, "torch_entry", backend=replaying)


def build_paths(base, names, dali_inductor: bool) -> dict[str, tuple[Callable, str]]:
    """name -> (callable, experts implementation); every model shares the base's parameter tensors."""
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    paths = {}
    for name in names:
        implementation, backend = PATHS[name]
        model = copy.deepcopy(base, memo=dict(shared))  # new modules and config, the same tensors
        used = set_experts(model, implementation)
        if name in QUANTIZED:  # the copy's modules get quantized weights; the base keeps its own
            dali_compile.quantize(model, **QUANTIZED[name])
            used = ", ".join(f"{part} {fmt}" for part, fmt in QUANTIZED[name].items())
        if backend == "dali":
            model = compiled_alone(model, name, backend="dali", options={"inductor": dali_inductor})
        elif backend == "dali-pywrapper":
            if not dali_inductor:
                continue  # without inductor there is no wrapper: the same as "dali"
            model = compiled_alone(model, name, backend="dali", options={"cpp_wrapper": False})
        elif backend is not None:
            model = compiled_alone(model, name, backend=backend)
        paths[name] = (model, used)
    return paths


def filled_cache(model, prompt: torch.Tensor, keyword: str):
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, **{keyword: cache}, use_cache=True, logits_to_keep=1)
    return cache


def decode_cache(model, tokens: torch.Tensor, keyword: str, kind: str):
    """A cache holding all but the last of `tokens` (kv of kv + 1). dynamic: filled with all of them and cropped
    back, so its tensors have the strides of every later step's cropped cache; static: a StaticCache of
    kv + STATIC_HEADROOM positions filled with the first kv (its decode step's mask hides the rest)."""
    if kind == "dynamic":
        cache = filled_cache(model, tokens, keyword)
        cache.crop(-1)
        return cache
    cache = StaticCache(config=model.config, max_cache_len=tokens.shape[1] - 1 + STATIC_HEADROOM)
    model(input_ids=tokens[:, :-1], **{keyword: cache}, use_cache=True, logits_to_keep=1)
    return cache


def decode_timed(model, ids: torch.Tensor, cache, kv: int, keyword: str) -> Timed:
    """One decode step at position kv; untimed after it, the cache back to kv tokens (a static cache's step
    writes position kv again: nothing to undo)."""
    kwargs = {"input_ids": ids, keyword: cache, "use_cache": True, "logits_to_keep": 1}
    if isinstance(cache, StaticCache):
        kwargs["cache_position"] = torch.tensor([kv])
        return Timed(lambda: model(**kwargs).logits)
    return Timed(lambda: model(**kwargs).logits, lambda: cache.crop(kv - cache.get_seq_length()))


def prefill_timed(model, prompt: torch.Tensor, config, keyword: str) -> Timed:
    state = {"cache": DynamicCache(config=config)}

    def step():
        return model(input_ids=prompt, **{keyword: state["cache"]}, use_cache=True, logits_to_keep=1).logits

    def reset():
        state["cache"] = DynamicCache(config=config)

    return Timed(step, reset)


def routed_call(model, call: Timed) -> tuple[torch.Tensor, dict]:
    """One call with the experts modules' routing recorded: (logits, {experts module: distinct expert ids}), the
    modules in model order."""
    routed = {m: set() for m in experts_modules(model)}

    def hook(module, args, kwargs):
        ids = args[1] if len(args) > 1 else kwargs["top_k_index"]
        routed[module].update(ids.flatten().tolist())

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in experts_modules(model)]
    try:
        logits = call.step()
        call.reset()
    finally:
        for handle in handles:
            handle.remove()
    return logits, routed


def floor_tensors(model, ids: torch.Tensor, routed: dict) -> list[torch.Tensor]:
    """The weights one decode step reads: dense weights (quantized ones as stored: codes and scales), the tokens'
    embedding rows, the routed experts (quantized: codes and scales). `routed` is keyed by the experts modules of
    the model eager ran, whose copy `model` may be: its experts modules are taken in the same order."""
    routed = dict(zip(experts_modules(model), routed.values(), strict=True))
    embedding = model.get_input_embeddings().weight
    expert_ids = {id(p) for m in experts_modules(model) for p in m.parameters(recurse=False)}
    dense = [p for p in model.parameters() if p is not embedding and id(p) not in expert_ids]
    dense += [b for m in model.modules() if isinstance(m, dali_compile.QuantizedLinear) for b in m.buffers()]
    rows = [embedding[t] for t in ids.flatten().unique().tolist()]
    experts = [p[e] for m, chosen in routed.items() for e in sorted(chosen) for p in m.parameters(recurse=False)]
    return [t.detach() for t in dense + rows + experts]


def prefill_flops(model, tokens: int, top_k: int) -> int:
    """Matmul FLOPs of a prefill with logits for the last token only (attention scores ignored)."""
    experts = experts_modules(model)
    expert_ids = {id(p) for m in experts for p in m.parameters(recurse=False)}
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    flops = 0
    for p in model.parameters():
        if p.dim() == 2 and p is not embedding and id(p) not in expert_ids:
            flops += 2 * (1 if p is head else tokens) * p.numel()
    per_token = sum(p[0].numel() for m in experts for p in m.parameters(recurse=False) if p.dim() == 3)
    return flops + 2 * tokens * top_k * per_token


# ---------------------------------------------------------------------------------------------------
# Timing and profiling


def timed_call(call: Timed) -> float:
    start = time.perf_counter()
    call.step()
    elapsed = time.perf_counter() - start
    call.reset()
    return elapsed


def interleaved_ms(calls: dict[str, Timed], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each side, over `repeats` rounds of blocks interleaved side by side (a block of short
    calls after BLOCK_WARM_SECONDS of untimed ones)."""
    blocks = {}
    for name, call in calls.items():
        elapsed = min(timed_call(call) for _ in range(max(1, warmup)))
        blocks[name] = max(1, min(BLOCK, int(BLOCK_SECONDS / elapsed)))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            time.sleep(COOLDOWN_S)
            warm_until = time.perf_counter() + (BLOCK_WARM_SECONDS if blocks[name] > 1 else 0)
            while time.perf_counter() < warm_until:
                timed_call(call)
            times[name].extend(timed_call(call) for _ in range(blocks[name]))
    if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
        print("warning: a path compiled during the timed rounds (raise --warmup)")
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def dali_breakdown(calls: dict[str, Timed], ms: dict[str, float], steps: int) -> dict[str, float]:
    """The breakdown of dali's step, taken on dali-pywrapper when it runs (the C++ wrapper hides inductor's kernels
    from the profiler), and the fixed cost's share of dali's step (see the module docstring)."""
    if "dali" not in calls:
        return {}
    parts = breakdown(calls["dali-pywrapper" if "dali-pywrapper" in calls else "dali"], steps) if steps > 0 else {}
    return {**parts, "fixed_ms": ms["dali-fixed"], "overhead_share": ms["dali-fixed"] / ms["dali"],
            "fixed_cold_ms": ms["dali-fixed-cold"], "fixed_cold_share": ms["dali-fixed-cold"] / ms["dali"],
            "entry_ms": ms["torch-entry"], "entry_share": ms["torch-entry"] / ms["dali"]}


# ---------------------------------------------------------------------------------------------------
# Points


def on_runtime_pool(call: Timed) -> Timed:
    """The same dali step with its synchronous kernels on the runtime's own pool instead of ATen's threads
    (`cpu_extension.set_step_threads`): what one thread budget for the whole step gains."""

    def step():
        cpu_extension.set_step_threads("pool")
        try:
            return call.step()
        finally:
            cpu_extension.set_step_threads("aten")

    return Timed(step, call.reset)


def after_streaming(call: Timed, buffer: torch.Tensor) -> Timed:
    """The same step, each one right after reading `buffer` (untimed, in the reset before it). In a real decode
    step the work outside the weight-reading kernels (guards, Python, glue, small kernels) runs on the caches the
    weights have just streamed through; back to back, the fixed-cost model keeps its own code and data in cache."""

    def reset():
        call.reset()
        cpu_extension.read_tensors(buffer)

    return Timed(call.step, reset)


def with_pool_variant(paths: dict, calls: dict[str, Timed], make) -> None:
    """Adds "dali-pool" (a fresh call of dali's compiled model, see on_runtime_pool) to paths and calls."""
    if "dali" in paths:
        paths["dali-pool"] = (paths["dali"][0], paths["dali"][1] + " (pool)")
        calls["dali-pool"] = on_runtime_pool(make(paths["dali"][0]))


def check(calls: dict[str, Timed], reference: torch.Tensor) -> dict[str, float]:
    """Each path's first call (it compiles): its logits' max relative error against eager's."""
    errors = {}
    for name, call in calls.items():
        got = call.step().double()
        call.reset()
        errors[name] = float((got - reference.double()).abs().max() / reference.double().abs().max())
    return errors


def best_torch_ms(ms: dict[str, float]) -> float:
    return min((ms[p] for p in TORCH_PATHS if p in ms), default=NAN)


def decode_point(base, paths, fixed, entry, model_name, dtype_name, batch, kv, args) -> list[Row]:
    keyword = cache_keyword(base)
    gen = torch.Generator().manual_seed(1000 * batch + kv)
    ids = torch.randint(0, base.config.vocab_size, (batch, 1), generator=gen)
    cache = decode_cache(base, torch.randint(0, base.config.vocab_size, (batch, kv + 1), generator=gen), keyword,
                         args.cache)
    reference, routed = routed_call(base, decode_timed(base, ids, copy.deepcopy(cache), kv, keyword))
    calls = {name: decode_timed(m, ids, copy.deepcopy(cache), kv, keyword) for name, (m, _) in paths.items()}
    paths = dict(paths)
    with_pool_variant(paths, calls, lambda m: decode_timed(m, ids, copy.deepcopy(cache), kv, keyword))
    errors = check(calls, reference)
    report = dali_compile.last_report()
    if "dali" in paths and report is not None:
        print(f"  {str(report).splitlines()[0]}")
    weights = {"floor": floor_tensors(base, ids, routed)}
    for name in paths:  # a quantized path reads its own bytes: its own floor
        if name in QUANTIZED:
            weights[f"floor {name}"] = floor_tensors(paths[name][0]._orig_mod, ids, routed)
    for key, tensors in weights.items():
        calls[key] = Timed(cpu_extension.tensor_reader(*tensors))
    if fixed is not None:  # dali on the same structure at tiny widths (fixed_cost_shape)
        fixed_model = fixed._orig_mod  # the cache is filled eagerly, as the paths' is by the base
        fixed_cache = decode_cache(fixed_model, torch.randint(0, fixed_model.config.vocab_size, (batch, kv + 1),
                                                              generator=gen),
                                   keyword, args.cache)
        calls["dali-fixed"] = decode_timed(fixed, ids, copy.deepcopy(fixed_cache), kv, keyword)
        calls["dali-fixed-cold"] = after_streaming(decode_timed(fixed, ids, fixed_cache, kv, keyword),
                                                   torch.ones(EVICT_BYTES, dtype=torch.uint8))
        calls["torch-entry"] = decode_timed(entry, ids, copy.deepcopy(cache), kv, keyword)
    ms = interleaved_ms(calls, args.warmup, args.repeats)
    parts = dali_breakdown(calls, ms, args.profile_steps)
    best, load = best_torch_ms(ms), os.getloadavg()[0]
    rows = []
    for name, (_, used) in paths.items():
        floor = f"floor {name}" if f"floor {name}" in weights else "floor"
        floor_mb = sum(t.numel() * t.element_size() for t in weights[floor]) / 1e6
        rows.append(Row("decode", model_name, dtype_name, batch, kv, 0, name, used, ms[name], best / ms[name],
                        errors[name], load, ms[floor], ms[floor] / ms[name], floor_mb,
                        **(parts if name == "dali" else {})))
    return rows


def prefill_point(base, paths, model_name, dtype_name, tokens, args) -> list[Row]:
    keyword = cache_keyword(base)
    prompt = torch.randint(0, base.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    reference = prefill_timed(base, prompt, base.config, keyword).step()
    calls = {name: prefill_timed(m, prompt, base.config, keyword) for name, (m, _) in paths.items()}
    paths = dict(paths)
    with_pool_variant(paths, calls, lambda m: prefill_timed(m, prompt, base.config, keyword))
    errors = check(calls, reference)
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    calls["gemm"] = Timed(lambda: torch.mm(a, b))
    ms = interleaved_ms(calls, args.warmup, args.repeats)
    flops, gemm_gflop_s = prefill_flops(base, tokens, base.config.num_experts_per_tok), 2 * GEMM_N**3 / ms["gemm"] / 1e6
    best, load = best_torch_ms(ms), os.getloadavg()[0]
    rows = []
    for name, (_, used) in paths.items():
        gflop_s = flops / ms[name] / 1e6
        rows.append(Row("prefill", model_name, dtype_name, 1, 0, tokens, name, used, ms[name], best / ms[name],
                        errors[name], load, gflop_s=gflop_s, gemm_gflop_s=gemm_gflop_s,
                        gemm_fraction=gflop_s / gemm_gflop_s))
    return rows


def run_model(model_name: str, dtype_name: str, args) -> list[Row]:
    torch._dynamo.reset()
    dali_compile.clear_reports()
    base = build_base(SHAPES[model_name], DTYPES[dtype_name])
    paths = build_paths(base, args.paths, not args.dali_no_inductor)
    fixed = entry = None
    if "dali" in paths:
        fixed_base = build_base(fixed_cost_shape(SHAPES[model_name]), DTYPES[dtype_name])
        fixed = build_paths(fixed_base, ["dali"], not args.dali_no_inductor)["dali"][0]
        entry = torch_entry(base)
    rows = []
    for batch in args.batch:
        for kv in args.kv:
            print(f"decode {model_name} {dtype_name} B={batch} kv={kv} ({args.cache} cache)", flush=True)
            rows += decode_point(base, paths, fixed, entry, model_name, dtype_name, batch, kv, args)
    for tokens in args.prefill:
        print(f"prefill {model_name} {dtype_name} P={tokens}", flush=True)
        rows += prefill_point(base, paths, model_name, dtype_name, tokens, args)
    del base, paths, fixed, entry
    gc.collect()
    torch._dynamo.reset()
    return rows


# ---------------------------------------------------------------------------------------------------
# Output


def print_header() -> None:
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"dali runtime: {cpu_extension.get_num_threads()} threads, ISA {cpu_extension.cpu_isa()}")
    print("vs best = best torch path's ms / ms; floor = reading the step's weight bytes once (same rounds) / ms")


def print_tables(rows: list[Row]) -> None:
    print(f"\ndecode\n{'model':<8} {'dtype':<5} {'B':>2} {'kv':>5} {'path':<17} {'impl':<10} {'ms':>9} "
          f"{'vs best':>7} {'floor ms':>8} {'floor':>6} {'MB':>7} {'rel err':>8} {'load':>5}")
    for r in (r for r in rows if r.phase == "decode"):
        print(f"{r.model:<8} {r.dtype:<5} {r.batch:>2} {r.kv:>5} {r.path:<17} {r.experts_impl:<10} {r.ms:>9.2f} "
              f"{r.vs_best_torch:>6.2f}x {r.floor_ms:>8.2f} {r.floor_fraction:>6.0%} {r.floor_mb:>7.1f} "
              f"{r.max_rel_err:>8.1e} {r.load:>5.1f}")
    print("\ndali decode step breakdown (profiled on dali-pywrapper: ms per step, share of the profiled step); "
          "fixed cost: dali's step of the same structure at tiny widths (same rounds), and its share of dali's step; "
          "after a weight stream: that step right after reading EVICT_BYTES, as a real step's work outside kernels; "
          "torch.compile's own call: the model under a backend that replays its outputs (same rounds)")
    for r in (r for r in rows if r.phase == "decode" and not math.isnan(r.profiled_ms)):
        parts = "  ".join(f"{p} {getattr(r, p + '_ms'):.2f} ({getattr(r, p + '_ms') / r.profiled_ms:.0%})"
                          for p in BREAKDOWN)
        print(f"{r.model:<8} {r.dtype:<5} B={r.batch} kv={r.kv}: step {r.profiled_ms:.2f}  {parts}  "
              f"fixed cost {r.fixed_ms:.2f} ms = {r.overhead_share:.1%} of the step (after a weight stream "
              f"{r.fixed_cold_ms:.2f} ms = {r.fixed_cold_share:.1%}), of which torch.compile's own call "
              f"{r.entry_ms:.2f} ms = {r.entry_share:.1%}")
    print(f"\nprefill (B=1; GFLOP/s of the matmuls, attention ignored; gemm = torch.mm {GEMM_N}^3 fp32)\n"
          f"{'model':<8} {'dtype':<5} {'P':>5} {'path':<17} {'ms':>9} {'vs best':>7} {'GFLOP/s':>8} "
          f"{'gemm':>7} {'of gemm':>7} {'rel err':>8} {'load':>5}")
    for r in (r for r in rows if r.phase == "prefill"):
        print(f"{r.model:<8} {r.dtype:<5} {r.prompt:>5} {r.path:<17} {r.ms:>9.2f} {r.vs_best_torch:>6.2f}x "
              f"{r.gflop_s:>8.1f} {r.gemm_gflop_s:>7.1f} {r.gemm_fraction:>7.1%} {r.max_rel_err:>8.1e} {r.load:>5.1f}")


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(f"wrote {path}")


def plot(rows: list[Row], path: str) -> None:
    """ms per path (bars, log scale) per point; decode and prefill panels, the decode floor as a dash."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); `pip install matplotlib` to get one")
        return
    phases = [p for p in ("decode", "prefill") if any(r.phase == p for r in rows)]
    fig, axes = plt.subplots(len(phases), 1, figsize=(12, 4 * len(phases)), squeeze=False)
    for ax, phase in zip(axes[:, 0], phases, strict=True):
        plot_phase(ax, [r for r in rows if r.phase == phase], phase)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_phase(ax, rows: list[Row], phase: str) -> None:
    points = list(dict.fromkeys((r.model, r.dtype, r.batch, r.kv, r.prompt) for r in rows))
    paths = list(dict.fromkeys(r.path for r in rows))
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        ms = {(r.model, r.dtype, r.batch, r.kv, r.prompt): r.ms for r in rows if r.path == name}
        ax.bar([x + i * width for x in range(len(points))], [ms.get(p, NAN) for p in points], width, label=name)
    if phase == "decode":
        floors = {(r.model, r.dtype, r.batch, r.kv, r.prompt): r.floor_ms for r in rows}
        ax.scatter([x + 0.4 - width / 2 for x in range(len(points))], [floors[p] for p in points], marker="_",
                   s=400, color="black", label="floor")
    labels = [f"{m} {d}\nB={b} kv={kv}" if phase == "decode" else f"{m} {d}\nP={p}" for m, d, b, kv, p in points]
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(points))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step" if phase == "decode" else "ms per prefill")
    ax.set_title(phase)
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(DEFAULT_MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="decode batch sizes")
    parser.add_argument("--kv", nargs="+", type=int, default=[32, 512], help="tokens in the cache at each step")
    parser.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                        help="decode over transformers' DynamicCache (default) or a StaticCache (see decode_cache)")
    parser.add_argument("--prefill", nargs="*", type=int, default=[64, 512], help="prompt lengths (B=1)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per point (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="calls per path after the correctness run")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps of dali's profiled breakdown (0: none)")
    parser.add_argument("--dali-no-inductor", action="store_true",
                        help="dali option inductor=False: the rewritten graph runs as plain FX (fast compile)")
    parser.add_argument("--csv", default="bench_decode.csv", help="output CSV (default: %(default)s)")
    parser.add_argument("--plot", help="output PNG (default: the CSV's name with .png)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.paths = [p for p in PATHS if p in args.paths]  # fixed order: torch paths first
    args.plot = args.plot or os.path.splitext(args.csv)[0] + ".png"
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    if not cpu_extension.cpu_extension_available():
        raise SystemExit("the C++ CPU runtime is not available (see the warning above): no floor to time")
    # one graph per path, shape and phase; inductor's kernels visible to the profiler (restored on return)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    print_header()
    rows = []
    with (torch._dynamo.config.patch({limit: max(getattr(torch._dynamo.config, limit), 256)}),
          torch._inductor.config.patch({"cpp.enable_kernel_profile": True}), torch.no_grad()):
        for model_name in args.models:
            for dtype_name in args.dtypes:
                rows += run_model(model_name, dtype_name, args)
    print_tables(rows)
    write_csv(rows, args.csv)
    if not args.no_plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()

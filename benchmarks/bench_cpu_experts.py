"""Benchmark: the C++ CPU expert runtime (`dali::cpu_experts`) against torch on the same CPU.

# T tokens, K top-k, H hidden, I intermediate, n tokens per expert

    python benchmarks/bench_cpu_experts.py                 # full grid, CSV to bench_cpu_experts.csv
    python benchmarks/bench_cpu_experts.py --quick         # decode and n=16, Qwen3 and OLMoE
    python benchmarks/bench_cpu_experts.py --models olmoe --dtypes bf16 --tokens 1 4
    python benchmarks/bench_cpu_experts.py --crossover --dtypes fp32 bf16   # streaming kernels vs ATen GEMM by n
    python benchmarks/bench_cpu_experts.py --crossover --dtypes int8 int4 --tokens 16 32 64   # quantized: the bf16 GEMM
    python benchmarks/bench_cpu_experts.py --quick --dtypes int8 int4   # quantized experts against bf16

Grid: the K routed experts of one token of Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite and OLMoE
(only the active experts are allocated), T = n tokens all routed to those K experts, so every expert
gets n tokens; bf16 and fp32. The weights cycle through enough copies ("layers") to total at least
--min-bytes, so no call finds the previous call's weights in the last-level cache: a real model
streams every layer's experts from DRAM too.

Per point, the median per call after warm-up, torch and ours alternating in blocks of up to 4
calls back to back (consecutive layers of a decode loop; alternation so that drifting load on a
shared machine hits both alike), at least --repeats rounds, more while they fit --budget seconds:
- torch: transformers' eager experts loop in the weight dtype (per expert F.linear gate/up, act * up,
  F.linear down, weighted index_add), the baseline a CPU user has today; not the fp32-upcast
  reference, which is artificially slow;
- ours: `dali::cpu_experts` (all experts selected) plus the caller's sum over k and cast, so both
  sides end at [T, H] in the weight dtype.
- limit: the physical limit for the same bytes, timed in the same rounds: the kernels' threads read
  exactly that call's expert weights once (`cpu_extension.tensor_reader`, a streaming sum of the
  words) and do nothing else. No kernel that reads every weight can beat it.
The header also gives the streaming read bandwidth of a 1 GiB buffer (best of 5) and torch's own
`sum`, for context: on a shared machine these move by +-30% within a minute, which is why the
fraction of the limit is taken against the limit measured beside each point, not against them.
Quantized formats (--dtypes int8 int4: `dali_compile.quantize`'s expert formats, int4 in groups of 32 with its
activations rounded to int8): the weights are the bf16 ones quantized; the rounds also time ours on the bf16
weights, so vs_bf16 = ours bf16 ms / ours quantized ms comes from the same rounds; torch stays the bf16 loop;
GB/s and the limit count the bytes actually read (codes and scales).
Columns: ms, GB/s of expert weights read (each read once per call), GFLOP/s, speedup = torch ms /
ours ms, the largest speedup the limit allows (torch ms / limit ms), ours as a fraction of the limit
(limit ms / ours ms), the limit's GB/s, and the load average (the development machine is shared:
torch's OpenMP loop degrades by up to 50x under load, ours by far less). Prints a table, writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from model_shapes import MODELS, ModelShape

from dali_compile.ops import cpu_experts  # noqa: F401  (defines the dali::cpu_experts* ops)
from dali_compile.ops.quantized_linear import quantize_stacked
from dali_compile.runtime import cpu_extension

TOKENS_PER_EXPERT = (1, 4, 16, 64, 256)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16, "int4": torch.bfloat16}
QUANTIZED = {"int8": (8, None), "int4": (4, 32)}  # name -> (bits, group size; None: one scale per row)


@dataclass(frozen=True)
class Result:
    model: str
    dtype: str
    tokens_per_expert: int
    torch_ms: float
    ours_ms: float
    speedup: float  # torch_ms / ours_ms
    weight_gb_s: float
    gflop_s: float
    limit_ms: float  # reading the same weights once, nothing else, timed in the same rounds
    limit_speedup: float  # torch_ms / limit_ms: the most any weight-reading kernel could gain
    bandwidth_fraction: float  # limit_ms / ours_ms
    read_bandwidth_gb_s: float  # the limit's GB/s
    load: float  # 1-minute load average when the point finished: other processes share these cores
    max_rel_diff: float
    isa: str
    threads: int
    vs_bf16: float = float("nan")  # quantized rows: ours on the bf16 weights / ours, same rounds


# Rounds alternate between the sides; within a round a side runs up to BLOCK calls back to back, as
# consecutive MoE layers do, so its threads are warm as in a decode loop (slow calls run alone). The
# pause between blocks lets the other side's spinning threads (torch's OpenMP pool, ours) go quiet:
# 5 ms was too short for torch's OpenMP threads after its expert loop. The side that ran right after
# torch (ours) then shared both cores with them: Qwen3 bf16 decode read at 81-85% of the limit with
# torch in the rounds, 95-97% without it, and 109% with torch and a 50 ms pause.
BLOCK = 4
BLOCK_SECONDS = 0.25
COOLDOWN_S = 0.05


def paired_ms(fns, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Median milliseconds per call of each fn, timed in alternating blocks (so drifting machine load
    hits every side alike), over at least `repeats` rounds or as many as fit `budget_s`, after warm-up."""
    blocks = []
    for fn in fns:
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
        blocks.append(max(1, min(BLOCK, int(BLOCK_SECONDS / elapsed))))
    times = [[] for _ in fns]
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < repeats or (time.perf_counter() < deadline and rounds < 10 * repeats):
        for fn, block, bucket in zip(fns, blocks, times, strict=True):
            time.sleep(COOLDOWN_S)
            for _ in range(block):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
        rounds += 1
    return [statistics.median(bucket) * 1e3 for bucket in times]


def torch_experts(hidden, ids, weights, up, down) -> torch.Tensor:
    """transformers' eager experts loop, in the weight dtype."""
    out = torch.zeros_like(hidden)
    for k in range(up.shape[0]):  # expert k is slot k of every token here
        rows = (ids == k).nonzero()
        tokens, slots = rows[:, 0], rows[:, 1]
        gate, up_half = F.linear(hidden[tokens], up[k]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up_half, down[k])
        out.index_add_(0, tokens, y * weights[tokens, slots, None].to(y.dtype))
    return out


def make_layers(model: ModelShape, dtype_name: str, min_bytes: int) -> list[tuple]:
    """Copies of the K experts' weights: (up, down), plus (up codes, down codes, up scales, down scales) for a
    quantized format (the same weights quantized)."""
    dtype = DTYPES[dtype_name]
    H, I, K = model.hidden, model.intermediate, model.top_k
    layer_bytes = K * 3 * H * I * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(min_bytes / layer_bytes))
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(copies):
        up = (torch.randn(K, 2 * I, H, generator=gen) * H**-0.5).to(dtype)
        down = (torch.randn(K, H, I, generator=gen) * I**-0.5).to(dtype)
        if dtype_name in QUANTIZED:
            bits, group = QUANTIZED[dtype_name]
            (qu, su), (qd, sd) = (quantize_stacked(w, bits, group) for w in (up, down))
            layers.append((up, down, qu, qd, su, sd))
        else:
            layers.append((up, down))
    return layers


def cycling(fn, layers):
    """fn(*layer) over the layers in turn, one layer per call."""
    state = {"i": 0}

    def call():
        layer = layers[state["i"] % len(layers)]
        state["i"] += 1
        return fn(*layer)

    return call


def bench_point(model: ModelShape, dtype_name: str, n: int, layers, args) -> Result:
    dtype = DTYPES[dtype_name]
    H, I, K = model.hidden, model.intermediate, model.top_k
    gen = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, H, generator=gen).to(dtype)
    ids = torch.arange(K).expand(n, K).contiguous()
    weights = torch.softmax(torch.randn(n, K, generator=gen), dim=-1)

    def ours_plain(up, down, *quantized):
        contributions = torch.ops.dali.cpu_experts(
            hidden, ids, weights, up, down, None, None, None, True, False, False, "silu", 0.0, 0.0
        )
        return contributions.sum(dim=1).to(dtype)

    def ours_quantized(up, down, qu, qd, su, sd):
        contributions = torch.ops.dali.cpu_experts(
            hidden, ids, weights, qu, qd, None, None, None, True, False, False, "silu", 0.0, 0.0, su, sd
        )
        return contributions.sum(dim=1).to(dtype)

    def theirs(up, down, *quantized):
        return torch_experts(hidden, ids, weights, up, down)

    # per layer, prepared (tensor_reader): the timed call is the read alone
    readers = [(cpu_extension.tensor_reader(*(layer[2:] or layer[:2])),) for layer in layers]

    quantized = dtype_name in QUANTIZED
    ours = ours_quantized if quantized else ours_plain
    want = theirs(*layers[0]).float()
    diff = float((ours(*layers[0]).float() - want).abs().max() / want.abs().max())
    warmup = 1 if n >= 64 else 2  # the last warm-up call also sizes the blocks
    sides = [cycling(theirs, layers), cycling(ours, layers), cycling(lambda read: read(), readers)]
    if quantized:
        sides.append(cycling(ours_plain, layers))
    torch_ms, ours_ms, limit_ms, *bf16_ms = paired_ms(sides, warmup, args.repeats, args.budget)
    weight_bytes = sum(t.nbytes for t in layers[0][2:]) if quantized else K * 3 * H * I * torch.finfo(dtype).bits // 8
    gb_s = weight_bytes / (ours_ms * 1e-3) / 1e9
    gflop_s = 2 * n * K * 3 * H * I / (ours_ms * 1e-3) / 1e9
    return Result(
        model.name, dtype_name, n, torch_ms, ours_ms, torch_ms / ours_ms, gb_s, gflop_s, limit_ms,
        torch_ms / limit_ms, limit_ms / ours_ms, weight_bytes / (limit_ms * 1e-3) / 1e9,
        os.getloadavg()[0], diff, cpu_extension.cpu_isa(), cpu_extension.get_num_threads(),
        bf16_ms[0] / ours_ms if bf16_ms else float("nan"),
    )


# Per dtype: (getter, setter) of the threshold from which its experts take ATen's GEMM (fp32: fp32 GEMM; bf16:
# ATen's bf16 GEMM on the stored weights, on by default only on CPUs with AMX-BF16; int8 / int4, with bf16
# hidden states here: the same bf16 GEMM on blocks of dequantized rows; int4's threshold is twice the set one,
# so its rows run the GEMM from 2 tokens on where 1 is set).
GEMM_THRESHOLDS = {
    "fp32": (cpu_extension.get_dense_gemm_min_tokens, cpu_extension.set_dense_gemm_min_tokens),
    "bf16": (cpu_extension.get_bf16_gemm_min_tokens, cpu_extension.set_bf16_gemm_min_tokens),
    "int8": (cpu_extension.get_quantized_bf16_gemm_min_rows, cpu_extension.set_quantized_bf16_gemm_min_rows),
    "int4": (cpu_extension.get_quantized_bf16_gemm_min_rows, cpu_extension.set_quantized_bf16_gemm_min_rows),
}


def crossover(args) -> None:
    """The streaming kernels against ATen's GEMM (fp32, and bf16 as stored), to place the dense-GEMM thresholds."""
    print(f"AMX-BF16: {cpu_extension.has_amx_bf16()}")
    for dtype_name in [d for d in args.dtypes if d in GEMM_THRESHOLDS]:
        get, set_threshold = GEMM_THRESHOLDS[dtype_name]
        default = get()
        print(f"{dtype_name} crossover (current threshold: {default} tokens per expert; <= 0: never the GEMM)")
        print(f"{'model':<18} {'n':>4} {'kernels ms':>11} {'gemm ms':>9} {'torch ms':>9} {'gemm/kernels':>12} "
              f"{'load':>5}")
        try:
            for model in [m for m in MODELS if m.name in args.models]:
                layers = make_layers(model, dtype_name, args.min_bytes)
                for n in args.tokens:
                    row = []
                    for threshold in (0, 1):  # 0: never the GEMM, 1: always
                        set_threshold(threshold)
                        row.append(bench_point(model, dtype_name, n, layers, args))
                    print(f"{model.name:<18} {n:>4} {row[0].ours_ms:>11.2f} {row[1].ours_ms:>9.2f} "
                          f"{row[0].torch_ms:>9.2f} {row[1].ours_ms / row[0].ours_ms:>12.2f} {row[1].load:>5.1f}",
                          flush=True)
                del layers
        finally:
            set_threshold(default)


def print_header(bandwidth: float, torch_sum: float) -> None:
    print(f"CPU: {cpu_extension.get_num_threads()} runtime threads, ISA path {cpu_extension.cpu_isa()}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"streaming read bandwidth: {bandwidth:.1f} GB/s (runtime threads; torch sum: {torch_sum:.1f} GB/s)")
    print("torch baseline: transformers' eager experts loop, F.linear in the weight dtype")
    print("limit: the kernels' threads only reading the same weights, timed in the same rounds")
    print(f"{'model':<18} {'dtype':<5} {'n':>4} {'torch ms':>10} {'ours ms':>9} {'speedup':>8} "
          f"{'GB/s':>6} {'GFLOP/s':>8} {'max spd':>8} {'of lim':>6} {'lim GB/s':>8} {'load':>5} {'rel diff':>9} "
          f"{'vs bf16':>8}")


def print_row(r: Result) -> None:
    print(f"{r.model:<18} {r.dtype:<5} {r.tokens_per_expert:>4} {r.torch_ms:>10.2f} {r.ours_ms:>9.2f} "
          f"{r.speedup:>7.2f}x {r.weight_gb_s:>6.1f} {r.gflop_s:>8.1f} {r.limit_speedup:>7.2f}x "
          f"{r.bandwidth_fraction:>6.0%} {r.read_bandwidth_gb_s:>8.1f} {r.load:>5.1f} {r.max_rel_diff:>9.1e} "
          f"{r.vs_bf16:>7.2f}x", flush=True)


def torch_sum_bandwidth(num_bytes: int) -> float:
    buffer = torch.ones(num_bytes // 4)
    buffer.sum()
    best = min(timed_once(buffer.sum) for _ in range(5))
    return num_bytes / best / 1e9


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=[m.name for m in MODELS], default=[m.name for m in MODELS])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS_PER_EXPERT),
                        help="tokens per expert (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="Qwen3 and OLMoE, n in {1, 16}")
    parser.add_argument("--crossover", action="store_true",
                        help="streaming kernels vs ATen GEMM by n (fp32, bf16; int8/int4: the bf16 GEMM)")
    parser.add_argument("--repeats", type=int, default=2, help="minimum rounds (blocks of calls per side) per point")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per point")
    parser.add_argument("--min-bytes", type=int, default=512 << 20,
                        help="weights cycled through per point, >> last-level cache (default: 512 MiB)")
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: physical cores)")
    parser.add_argument("--isa", choices=["auto", *cpu_extension.ISA_NAMES], default="auto")
    parser.add_argument("--csv", default="bench_cpu_experts.csv", help="output CSV (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = ["qwen3-30b-a3b", "olmoe"]
        args.tokens = [1, 16]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not cpu_extension.cpu_extension_available():
        raise SystemExit("the C++ CPU runtime is not available (see the warning above)")
    if args.threads:
        cpu_extension.set_num_threads(args.threads)
    cpu_extension.set_isa(args.isa)
    if args.crossover:
        crossover(args)
        return
    print_header(cpu_extension.read_bandwidth_gbps(1 << 30, 5), torch_sum_bandwidth(1 << 30))
    results = []
    for model in [m for m in MODELS if m.name in args.models]:
        for dtype_name in args.dtypes:
            layers = make_layers(model, dtype_name, args.min_bytes)
            for n in args.tokens:
                results.append(bench_point(model, dtype_name, n, layers, args))
                print_row(results[-1])
            del layers
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

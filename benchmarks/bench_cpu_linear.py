"""Benchmark: `dali::cpu_linear` (the dense linear layers of a step) against torch's F.linear, by row count.

# T rows (tokens), N output features, C input features

    python benchmarks/bench_cpu_linear.py                  # every shape, bf16 and fp32, T = 1 .. 512
    python benchmarks/bench_cpu_linear.py --shapes olmoe-qkvo --dtypes bf16 --rows 1 4 16 64

Places the crossover of `cpu_extension.set_linear_gemm_min_rows`: per point, in alternating blocks
(`bench_cpu_experts.paired_ms`), median ms of
- torch: F.linear in the weight dtype (what the model runs without dali);
- stream: our streaming kernel on the runtime's pool (forced: threshold off);
- gemm: ATen's GEMM behind the op (forced: threshold 1): fp32; 16-bit weights widened chunk by chunk, or, on a CPU
  with AMX-BF16, bf16 weights multiplied as stored (`set_linear_bf16_gemm_min_rows`);
- limit: the kernels' threads only reading the same weight (`cpu_extension.tensor_reader`).
Weights cycle through copies totalling --min-bytes so no call finds them in the last-level cache.
Columns: ms of each, GB/s and GFLOP/s of the faster of ours, the fraction of the limit for stream,
the load average. Prints a table, writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from bench_cpu_experts import paired_ms

from dali_compile.ops import cpu_linear  # noqa: F401  (defines dali::cpu_linear)
from dali_compile.runtime import cpu_extension

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int  # N
    in_features: int  # C


SHAPES = (
    LinearShape("olmoe-qkvo", 2048, 2048),
    LinearShape("qwen3-q", 4096, 2048),
    LinearShape("qwen3-o", 2048, 4096),
    LinearShape("mixtral-kv", 1024, 4096),
)


@dataclass(frozen=True)
class Result:
    shape: str
    dtype: str
    rows: int
    torch_ms: float
    stream_ms: float
    gemm_ms: float
    limit_ms: float
    stream_of_limit: float  # limit_ms / stream_ms
    best_gflop_s: float
    load: float


def make_weights(shape: LinearShape, dtype, min_bytes: int) -> list[torch.Tensor]:
    one = shape.out_features * shape.in_features * torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(shape.out_features, shape.in_features, generator=gen) * shape.in_features**-0.5).to(dtype)
        for _ in range(max(1, math.ceil(min_bytes / one)))
    ]


def cycling(fn, weights):
    state = {"i": 0}

    def call():
        w = weights[state["i"] % len(weights)]
        state["i"] += 1
        return fn(w)

    return call


def with_threshold(rows: int, fn):
    """fn with the op's GEMM thresholds at `rows` (0: the streaming kernel always). The bf16 GEMM on stored weights
    stays off where it is off by default (no AMX-BF16): there the op's GEMM widens 16-bit weights to fp32."""
    bf16_rows = rows if cpu_extension.has_amx_bf16() else 0

    def call(w):
        cpu_extension.set_linear_gemm_min_rows(rows)
        cpu_extension.set_linear_bf16_gemm_min_rows(bf16_rows)
        return fn(w)

    return call


def bench_point(shape: LinearShape, dtype_name: str, rows: int, weights, args) -> Result:
    x = torch.randn(rows, shape.in_features).to(DTYPES[dtype_name])
    ours = lambda w: torch.ops.dali.cpu_linear(x, w, None)  # noqa: E731
    fns = [
        lambda w: F.linear(x, w),
        with_threshold(0, ours),
        with_threshold(1, ours),
    ]
    readers = [cpu_extension.tensor_reader(w) for w in weights]  # prepared: the timed call is the read alone
    torch_ms, stream_ms, gemm_ms, limit_ms = paired_ms(
        [cycling(fn, weights) for fn in fns] + [cycling(lambda read: read(), readers)], 2, args.repeats, args.budget
    )
    best = min(stream_ms, gemm_ms)
    return Result(shape.name, dtype_name, rows, torch_ms, stream_ms, gemm_ms, limit_ms, limit_ms / stream_ms,
                  2 * rows * shape.out_features * shape.in_features / (best * 1e-3) / 1e9, os.getloadavg()[0])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], default=[s.name for s in SHAPES])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed rounds per point")
    parser.add_argument("--min-bytes", type=int, default=256 << 20)
    parser.add_argument("--csv", default="bench_cpu_linear.csv")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not cpu_extension.cpu_extension_available():
        raise SystemExit("the C++ CPU runtime is not available (see the warning above)")
    default = cpu_extension.get_linear_gemm_min_rows()
    default_bf16 = cpu_extension.get_linear_bf16_gemm_min_rows()
    print(f"{cpu_extension.get_num_threads()} runtime threads, ISA {cpu_extension.cpu_isa()}, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; current thresholds {default} rows, "
          f"bf16 as stored {default_bf16} rows (AMX-BF16: {cpu_extension.has_amx_bf16()})")
    print(f"{'shape':<12} {'dtype':<5} {'T':>4} {'torch ms':>9} {'stream ms':>10} {'gemm ms':>8} {'limit ms':>9} "
          f"{'of lim':>7} {'GFLOP/s':>8} {'load':>5}")
    results = []
    try:
        for shape in [s for s in SHAPES if s.name in args.shapes]:
            for dtype_name in args.dtypes:
                weights = make_weights(shape, DTYPES[dtype_name], args.min_bytes)
                for rows in args.rows:
                    r = bench_point(shape, dtype_name, rows, weights, args)
                    results.append(r)
                    print(f"{r.shape:<12} {r.dtype:<5} {r.rows:>4} {r.torch_ms:>9.3f} {r.stream_ms:>10.3f} "
                          f"{r.gemm_ms:>8.3f} {r.limit_ms:>9.3f} {r.stream_of_limit:>7.0%} {r.best_gflop_s:>8.1f} "
                          f"{r.load:>5.1f}", flush=True)
    finally:
        cpu_extension.set_linear_gemm_min_rows(default)
        cpu_extension.set_linear_bf16_gemm_min_rows(default_bf16)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

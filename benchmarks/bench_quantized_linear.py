"""Benchmark: `dali::quantized_linear` (int8, int4) against `dali::cpu_linear` on bf16 weights, at decode row counts.

# T rows (tokens), N output features, C input features, G int4 group size

    python benchmarks/bench_quantized_linear.py                       # every shape, T = 1 4 16
    python benchmarks/bench_quantized_linear.py --shapes olmoe-qkvo --rows 1 --groups 32 128

Per point, in alternating blocks (`bench_cpu_experts.paired_ms`), median ms of bf16 (`cpu_linear`, the
streaming kernel), int8 (one scale per row) and int4 at each --groups size, each with its own limit: the
kernels' threads only reading the same bytes (codes and scales; `cpu_extension.tensor_reader`). Weights
cycle through copies totalling --min-bytes per format so no call finds them in the last-level cache.
Columns: ms, GB/s of the bytes actually read, the fraction of that format's limit, the speedup over
bf16 in the same rounds (the ideal is the byte ratio: ~2x int8, ~3.5-4x int4), the load average.
"""

from __future__ import annotations

import argparse
import csv
import os
from dataclasses import asdict, dataclass

import torch
from bench_cpu_experts import paired_ms
from bench_cpu_linear import SHAPES, cycling, make_weights

from dali_compile.ops.quantized_linear import quantize_weight
from dali_compile.runtime import cpu_extension


@dataclass(frozen=True)
class Result:
    shape: str
    rows: int
    format: str
    ms: float
    mb_per_call: float
    gb_s: float
    limit_ms: float
    of_limit: float  # limit_ms / ms
    vs_bf16: float  # bf16 ms / ms, same rounds
    load: float


def formats(groups: list[int]) -> list[tuple[str, int | None, int | None]]:
    """(name, bits, group size): bf16 first (bits None)."""
    return [("bf16", None, None), ("int8", 8, None)] + [(f"int4 g{g}", 4, g) for g in groups]


def bench_shape(shape, rows_list, groups, args) -> list[Result]:
    bf16 = make_weights(shape, torch.bfloat16, args.min_bytes)
    stored = {"bf16": [(w,) for w in bf16]}
    for name, bits, group in formats(groups)[1:]:
        stored[name] = [quantize_weight(w, bits, group) for w in bf16]
    results = []
    for rows in rows_list:
        x = torch.randn(rows, shape.in_features).to(torch.bfloat16)
        calls, limits = [], []
        for name, bits, group in formats(groups):
            if bits is None:
                calls.append(cycling(lambda w, x=x: torch.ops.dali.cpu_linear(x, w[0], None), stored[name]))
            else:
                g = shape.in_features if group is None else group
                def quantized(w, x=x, b=bits, g=g):
                    return torch.ops.dali.quantized_linear(x, w[0], w[1], None, b, g)

                calls.append(cycling(quantized, stored[name]))
            limits.append(cycling(lambda read: read(), [cpu_extension.tensor_reader(*w) for w in stored[name]]))
        ms = paired_ms(calls + limits, 2, args.repeats, args.budget)
        n = len(calls)
        for i, (name, _, _) in enumerate(formats(groups)):
            mb = sum(t.nbytes for t in stored[name][0]) / 1e6
            results.append(Result(shape.name, rows, name, ms[i], mb, mb / ms[i], ms[n + i], ms[n + i] / ms[i],
                                  ms[0] / ms[i], os.getloadavg()[0]))
    return results


def main(argv=None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", choices=[s.name for s in SHAPES], default=[s.name for s in SHAPES])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--groups", nargs="+", type=int, default=[32, 128], help="int4 group sizes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed rounds per point")
    p.add_argument("--min-bytes", type=int, default=256 << 20)
    p.add_argument("--csv", default="bench_quantized_linear.csv")
    args = p.parse_args(argv)
    if not cpu_extension.cpu_extension_available():
        raise SystemExit("the C++ CPU runtime is not available (see the warning above)")
    print(f"{cpu_extension.get_num_threads()} runtime threads, ISA {cpu_extension.cpu_isa()}, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'shape':<12} {'T':>3} {'format':<9} {'ms':>8} {'MB':>7} {'GB/s':>6} {'limit ms':>9} {'of lim':>7} "
          f"{'vs bf16':>8} {'load':>5}")
    results = []
    for shape in [s for s in SHAPES if s.name in args.shapes]:
        for r in bench_shape(shape, args.rows, args.groups, args):
            results.append(r)
            print(f"{r.shape:<12} {r.rows:>3} {r.format:<9} {r.ms:>8.3f} {r.mb_per_call:>7.2f} {r.gb_s:>6.1f} "
                  f"{r.limit_ms:>9.3f} {r.of_limit:>7.0%} {r.vs_bf16:>7.2f}x {r.load:>5.1f}", flush=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    print(f"wrote {args.csv}")
    return results


if __name__ == "__main__":
    main()

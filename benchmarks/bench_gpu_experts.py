"""Benchmark: the Triton expert kernels (`dali::gpu_experts`) against torch's grouped matmul, bf16.

# T tokens, K top-k, E experts, H hidden, I intermediate, n rows (tokens) per expert

    python benchmarks/bench_gpu_experts.py                      # full grid, CSV to bench_gpu_experts.csv
    python benchmarks/bench_gpu_experts.py --models qwen3-30b-a3b --tokens 1 16 --repeats 50

Grid: the routed experts of Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite and OLMoE, every expert
active with n = 1, 4, 16, 64, 256, 1024 rows each (balanced routing: row t*K + k goes to expert
(t*K + k) mod E). Per point, the median of --repeats timed runs after --warmup runs, CUDA events:
- torch: what transformers' `grouped_mm` experts do (sort rows by expert, gather, grouped matmul,
  activation, grouped matmul, weighted scatter); a loop of per-expert matmuls where torch has no
  grouped matmul;
- ours: the Triton launcher (routing kernel, gate/up + activation, down + weighting) with an identity
  slot table over the model's weights (the op minus its one host-synchronising bounds check), plus the
  caller's sum over k of the [T, K, H] fp32 contributions, so both sides end at [T, H] bf16.
Physical limits are measured in the same run: device copy bandwidth (read + write) and the bf16 matmul
rate of one large torch.mm. Decode points (n <= 16) report the fraction of bandwidth spent reading the
weights once; prefill points the fraction of the matmul rate. Prints a table, writes a CSV.
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from model_shapes import MODELS, ModelShape

TOKENS_PER_EXPERT = (1, 4, 16, 64, 256, 1024)
DECODE_MAX_ROWS = 16  # up to here a point is bound by reading weights, beyond by the matmuls


@dataclass(frozen=True)
class Result:
    model: str
    rows_per_expert: float
    tokens: int
    torch_ms: float
    ours_ms: float
    ratio_ours_over_torch: float
    weight_gb_s: float
    bandwidth_fraction: float
    tflops: float
    matmul_fraction: float
    max_rel_diff: float
    baseline: str


def timed_ms(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after `warmup` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gb_s(warmup: int, repeats: int) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), warmup, repeats)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def matmul_tflops(warmup: int, repeats: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timed_ms(lambda: torch.mm(a, b), warmup, repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _grouped_mm_fn():
    """torch's grouped matmul [rows, in] x [G, in, out] with offsets, or None where it has none."""
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm
    return getattr(torch, "_grouped_mm", None)


def torch_experts(hidden, ids, weights, up, down, grouped_mm):
    """transformers' grouped_mm experts (Mixtral layout): returns [T, H] in hidden's dtype."""
    T, K = ids.shape
    E = up.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    x = hidden[order // K]
    if grouped_mm is not None:
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        h = grouped_mm(x, up.transpose(1, 2), offs=offs)
        gate, up_half = h.chunk(2, dim=-1)
        y = grouped_mm(F.silu(gate) * up_half, down.transpose(1, 2), offs=offs)
    else:  # a loop of matmuls, one per expert (host syncs on the counts, as eager implementations do)
        counts = torch.bincount(flat, minlength=E).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            h = x[start:start + n] @ up[e].T
            gate, up_half = h.chunk(2, dim=-1)
            outs.append((F.silu(gate) * up_half) @ down[e].T)
            start += n
        y = torch.cat(outs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(hidden).index_add_(0, order // K, y)


def balanced_routing(model: ModelShape, rows_per_expert: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K] with row t*K + k on expert (t*K + k) mod E (distinct per token as K <= E), softmax weights."""
    T = max(1, round(model.experts * rows_per_expert / model.top_k))
    rows = torch.arange(T * model.top_k, device=device)
    ids = (rows % model.experts).reshape(T, model.top_k)
    weights = torch.softmax(torch.randn(T, model.top_k, device=device), dim=-1)
    return ids, weights


def bench_model(model: ModelShape, tokens: list[int], limits: tuple[float, float], args) -> list[Result]:
    from dali_compile.ops.triton_experts import run_gpu_experts

    bandwidth, tflops_peak = limits
    H, I, E = model.hidden, model.intermediate, model.experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    up = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) * H**-0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, device="cuda", generator=gen) * I**-0.5).to(torch.bfloat16)
    identity = torch.arange(E, dtype=torch.int32, device="cuda")
    grouped_mm = _grouped_mm_fn()
    baseline = "grouped_mm" if grouped_mm is not None else "matmul loop"
    weight_bytes = up.numel() * up.element_size() + down.numel() * down.element_size()
    results = []
    for n in tokens:
        ids, weights = balanced_routing(model, n, "cuda")
        T = ids.shape[0]
        hidden = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)

        contributions = functools.partial(run_gpu_experts, hidden, ids, weights, up, down, None, None, identity,
                                          True, False, False, "silu", 0.0, 0.0)

        def ours(contributions=contributions):  # with the caller's combine over k, as torch's output has it
            return contributions().sum(1).to(torch.bfloat16)

        theirs = functools.partial(torch_experts, hidden, ids, weights, up, down, grouped_mm)

        diff = (ours().float() - theirs().float()).abs().max() / theirs().float().abs().max()
        torch_ms = timed_ms(theirs, args.warmup, args.repeats)
        ours_ms = timed_ms(ours, args.warmup, args.repeats)
        flops = 2 * T * model.top_k * 3 * H * I
        achieved_gb_s = weight_bytes / (ours_ms * 1e-3) / 1e9
        achieved_tflops = flops / (ours_ms * 1e-3) / 1e12
        results.append(Result(
            model.name, T * model.top_k / E, T, torch_ms, ours_ms, ours_ms / torch_ms, achieved_gb_s,
            achieved_gb_s / bandwidth, achieved_tflops, achieved_tflops / tflops_peak, float(diff), baseline,
        ))
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'model':<18} {'rows/E':>7} {'T':>6} {'torch ms':>9} {'ours ms':>9} {'ours/torch':>10} "
          f"{'limit used':>14} {'max diff':>9}")
    for r in results:
        bound = (f"{r.bandwidth_fraction:6.1%} of BW" if r.rows_per_expert <= DECODE_MAX_ROWS
                 else f"{r.matmul_fraction:6.1%} of MM")
        print(f"{r.model:<18} {r.rows_per_expert:>7.1f} {r.tokens:>6} {r.torch_ms:>9.3f} {r.ours_ms:>9.3f} "
              f"{r.ratio_ours_over_torch:>10.2f} {bound:>14} {r.max_rel_diff:>9.1e}")


def parse_args(argv=None):
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=[m.name for m in MODELS], default=[m.name for m in MODELS])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS_PER_EXPERT),
                        help="rows per expert (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", default="bench_gpu_experts.csv", help="output CSV (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_experts: no CUDA device here; run it on a machine with a GPU (torch with CUDA, triton)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_gpu_experts: triton is not installed; the kernels under test need it")
    torch.backends.cuda.matmul.allow_tf32 = False
    bandwidth = copy_bandwidth_gb_s(args.warmup, args.repeats)
    peak = matmul_tflops(args.warmup, args.repeats)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    results = []
    for model in MODELS:
        if model.name in args.models:
            results += bench_model(model, args.tokens, (bandwidth, peak), args)
            torch.cuda.empty_cache()  # the next model's pools
    print_table(results)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(results[0])) + ["copy_gb_s", "matmul_tflops"])
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), "copy_gb_s": bandwidth, "matmul_tflops": peak})
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()

"""Benchmark: `dali_compile.load` against what a user writes today (`from_pretrained`, then `quantize`), from a
checkpoint on disk to a ready CPU model: seconds and the host memory loading takes.

    python benchmarks/bench_load.py                          # 2-layer OLMoE-shaped bf16 checkpoint (~1.7 GB)
    python benchmarks/bench_load.py --checkpoint DIR         # an existing checkpoint (also a real one)
    python benchmarks/bench_load.py --layers 4 --repeats 5 --csv bench_load.csv

Without --checkpoint it writes one (OLMoE-1B-7B's shapes from model_shapes.py, cut to --layers layers, random
bf16 weights, per-expert tensors as save_pretrained writes them, shards of --shard-size) under --workdir,
once. Each load runs in a fresh process (nothing imported or cached from the one before but the page cache),
after a warm-up load of a tiny checkpoint of the same family in that process (imports, the C++ runtime):
- time: the median of --repeats processes, ours and the baseline alternating;
- memory: one more process each, sampling its anonymous resident memory every 2 ms (RssAnon: the mapped
  shards' file pages aside, which the kernel drops under pressure); the sampler's thread slows the load, so
  these processes are not timed. Reported against the loaded model's resident bytes and the largest shard.
- limit: reading every checkpoint byte once from the page cache in the same rounds (numpy sum over the
  memory-mapped shards), the least any loader needs.
Columns: mode, median s, ratio (baseline s / ours s), fraction of the limit (limit s / s), peak MB over the
process's start, resident MB, largest shard MB, load average. The machine is shared: quote the ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = {  # mode -> (how, quantize)
    "from_pretrained": ("hf", None),
    "load": ("dali", None),
    "from_pretrained+quantize int4": ("hf", "int4"),
    "load int4": ("dali", "int4"),
}
BASELINE = {"load": "from_pretrained", "load int4": "from_pretrained+quantize int4"}


def child(checkpoint: str, warm: str, how: str, quantize: str, sample: bool) -> None:
    """One load in this fresh process; prints one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    import dali_compile
    from dali_compile.memory_budget import anonymous_memory

    experts = None if quantize == "none" else {"experts": quantize}
    dali_compile.load(warm, device="cpu", quantize=experts, progress=False)
    AutoModelForCausalLM.from_pretrained(warm, dtype=torch.bfloat16)
    base, peak, done = anonymous_memory(), [0], threading.Event()
    peak[0] = base

    def sampler() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_memory())
            time.sleep(0.002)

    if sample:
        threading.Thread(target=sampler, daemon=True).start()
    start = time.perf_counter()
    if how == "hf":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
        if experts:
            dali_compile.quantize(model, **experts)
    else:
        model = dali_compile.load(checkpoint, device="cpu", dtype=torch.bfloat16, quantize=experts, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    print(json.dumps(dict(seconds=seconds, peak=peak[0] - base, resident=sum(t.numel() * t.element_size()
                                                                              for t in tensors))))


def run_child(args, how: str, quantize: str | None, sample: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(args.checkpoint), str(args.warm), how, quantize or "none",
               "1" if sample else "0"]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"child failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_limit(shards: list[Path]) -> float:
    """Seconds to read every byte of the shards once from the page cache (a sum over their memory maps)."""
    import numpy as np

    start = time.perf_counter()
    for shard in shards:
        data = np.memmap(shard, dtype=np.uint8, mode="r")
        data.view(np.uint64)[: data.size // 8].sum() if data.size >= 8 else data.sum()
        del data
    return time.perf_counter() - start


def write_checkpoint(args) -> Path:
    import torch

    from dali_compile.tiny_models import write_tiny_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from model_shapes import model_shape

    shape = model_shape("olmoe")
    directory = Path(args.workdir) / f"olmoe-{args.layers}layers-bf16"
    warm = Path(args.workdir) / "olmoe-warm"
    if not (directory / "config.json").exists():
        print(f"writing {directory} (once)...", flush=True)
        write_tiny_checkpoint(directory, "olmoe", torch.bfloat16, max_shard_size=args.shard_size,
                              hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                              num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                              num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                              vocab_size=512)
    if not (warm / "config.json").exists():
        write_tiny_checkpoint(warm, "olmoe", torch.bfloat16, hidden_size=64, intermediate_size=64, num_experts=8,
                              num_hidden_layers=1, vocab_size=512)
    args.warm = warm
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="an existing checkpoint directory")
    parser.add_argument("--workdir", default="/tmp/dali_bench_load", help="where the written checkpoint goes")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default="bench_load.csv")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        checkpoint, warm, how, quantize, sample = args.child
        child(checkpoint, warm, how, quantize, sample == "1")
        return 0
    if args.checkpoint is None:
        args.checkpoint = write_checkpoint(args)
    else:
        args.warm = args.checkpoint  # a real checkpoint warms up on itself
    shards = sorted(args.checkpoint.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards)
    print(f"{args.checkpoint}: {len(shards)} shards, {sum(s.stat().st_size for s in shards) / 1e6:.0f} MB; "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    limits = []
    for _ in range(args.repeats):
        limits.append(read_limit(shards))
        for mode, (how, quantize) in MODES.items():
            seconds[mode].append(run_child(args, how, quantize, sample=False)["seconds"])
    limit = statistics.median(limits)
    rows = []
    print(f"{'mode':<30} {'s':>7} {'ratio':>6} {'of limit':>8} {'peak MB':>8} {'resident MB':>11} "
          f"{'shard MB':>8} {'load':>5}")
    for mode, (how, quantize) in MODES.items():
        memory = run_child(args, how, quantize, sample=True)
        median = statistics.median(seconds[mode])
        baseline = BASELINE.get(mode)
        ratio = statistics.median(seconds[baseline]) / median if baseline else None
        row = dict(mode=mode, seconds=median, ratio=ratio, of_limit=limit / median, peak_mb=memory["peak"] / 1e6,
                   resident_mb=memory["resident"] / 1e6, shard_mb=largest / 1e6, load=os.getloadavg()[0])
        rows.append(row)
        print(f"{mode:<30} {median:>7.2f} {'' if ratio is None else f'{ratio:.2f}x':>6} {row['of_limit']:>8.1%} "
              f"{row['peak_mb']:>8.0f} {row['resident_mb']:>11.0f} {row['shard_mb']:>8.0f} {row['load']:>5.2f}")
    print(f"limit: every checkpoint byte read once from the page cache, {limit:.2f} s (median of {len(limits)})")
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

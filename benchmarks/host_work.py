"""Benchmark: the host work of the offload path per MoE layer step, in real decode steps.

    python benchmarks/host_work.py                      # tiny Qwen3-MoE, 6 layers, 128 experts, batch 1
    python benchmarks/host_work.py --layers 4 --experts 64 --steps 64 --repeats 7

The host work is `offload_stats`' `host_s` (routing to the host, counting, the policy, the prefetch's
prediction and issue, the copies' and launches' issue, the combine's launch, the step's Python): the host
thread's CPU time in the layer steps, minus what is not host work (the emulated accelerator's own copies and
reference compute, and the CPU experts' kernels, which run on the step's thread). Issue 16's target: at most
100 us per MoE layer step at decode batch 1 on the 2-core development machine.

Per policy (all_cpu; dali without prefetch; dali with its default prefetch), a model offloaded to the
emulated accelerator runs a prefill, then --repeats blocks of --steps greedy decode steps; per block, host
us per layer step and ms per token (the whole model's step, wall clock). Min and median over the blocks, the
last block's hit rate and copies per layer step; the machine's load average is printed beside them (thread
CPU time also grows on a busy host). `--tokens random` feeds random tokens instead of the model's argmax
(which, with random weights, soon repeats one token and so the same cached experts every step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import dali_compile
from dali_compile.hf_compat import cache_keyword
from dali_compile.offload import runtime_of
from dali_compile.tiny_models import tiny_model

TARGET_US = 100.0
PATHS = (("all_cpu", "all_cpu", {}), ("dali", "dali", {"prefetch": 0}), ("dali+prefetch", "dali", {}))


def decode_blocks(model, prompt: torch.Tensor, steps: int, repeats: int,
                  feed: torch.Generator | None = None) -> tuple[list[float], list[float]]:
    """(host us per layer step, ms per token) of each block of `steps` greedy decode steps after a prefill; with
    `feed`, each step's input is a random token drawn from it instead of the model's own argmax."""
    from transformers import DynamicCache

    runtime, keyword = runtime_of(model), cache_keyword(model)
    host_us, token_ms = [], []
    with torch.no_grad():
        for _ in range(repeats):
            cache = DynamicCache()  # filled in place by every forward
            token = model(prompt, use_cache=True, **{keyword: cache}).logits[:, -1:].argmax(-1)
            fed = None if feed is None else torch.randint(0, model.config.vocab_size, (steps, *token.shape),
                                                          generator=feed)
            runtime.reset_stats()
            started = time.perf_counter()
            for step in range(steps):
                token = model(token if fed is None else fed[step], use_cache=True,
                              **{keyword: cache}).logits[:, -1:].argmax(-1)
            token_ms.append((time.perf_counter() - started) / steps * 1e3)
            total = runtime.stats()["total"]
            host_us.append(total["host_s"] / total["steps"] * 1e6)
    return host_us, token_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per block")
    parser.add_argument("--repeats", type=int, default=5, help="blocks per path")
    parser.add_argument("--expert-memory", default="2MiB")
    parser.add_argument("--tokens", choices=("argmax", "random"), default="argmax",
                        help="each step's input: the model's own argmax (a random-weight model soon repeats one "
                             "token: the same experts every step, all cached) or a random token (routing that "
                             "changes: misses, and the window's swaps)")
    args = parser.parse_args(argv)
    print(f"tiny qwen3_moe: {args.layers} layers, {args.experts} experts, batch {args.batch}, emulated accelerator, "
          f"expert memory {args.expert_memory}, {args.tokens} tokens; target {TARGET_US:.0f} us per layer step")
    print(f"{'path':<14} {'host us/layer step':>22} {'vs target':>9} {'ms/token':>16} {'hit%':>5} "
          f"{'copies':>6} {'load':>5}")
    for label, policy, options in PATHS:
        torch.manual_seed(0)
        model = tiny_model("qwen3_moe", num_hidden_layers=args.layers, num_experts=args.experts)
        model = dali_compile.offload(model, device="emulated", expert_memory=args.expert_memory, policy=policy,
                                     **options)
        prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len))
        feed = torch.Generator().manual_seed(1) if args.tokens == "random" else None
        decode_blocks(model, prompt, 4, 1, feed)  # warm-up: the cost model, the caches, the allocator
        host_us, token_ms = decode_blocks(model, prompt, args.steps, args.repeats, feed)
        best, total = min(host_us), runtime_of(model).stats()["total"]  # the counters of the last block
        print(f"{label:<14} {best:>8.0f} (median {statistics.median(host_us):>4.0f}) {best / TARGET_US:>8.2f}x "
              f"{min(token_ms):>6.2f} (med {statistics.median(token_ms):>5.2f}) {100 * total['hit_rate']:>5.1f} "
              f"{total['copies'] / total['steps']:>6.2f} {os.getloadavg()[0]:>5.2f}", flush=True)
        dali_compile.release(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

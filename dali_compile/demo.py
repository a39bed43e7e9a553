"""Demo: compile a built-in tiny MoE with the dali backend and generate, eager vs dali; then offload it.

    python -m dali_compile.demo [--family mixtral] [--tokens 32] [--no-inductor] [--dtype bf16]
                                [--policy dali] [--expert-fraction 0.5] [--no-offload]
                                [--checkpoint DIR] [--no-checkpoint]

Part 1 prints the rewrite report, both token sequences' agreement, and tokens/s of each (experts run
in the C++ CPU runtime). Part 2 offloads the same model (`dali_compile.offload`) with a budget for a
fraction of its experts, to CUDA when there is a GPU and otherwise to the emulated accelerator (a CPU
test double whose timings mean nothing), generates again through torch.compile, checks the tokens,
and prints the runtime's statistics. Part 3 writes the model as a Hugging Face checkpoint (several
safetensors shards, a character vocabulary) to a temporary directory, or to `--checkpoint DIR` to keep it,
loads it back with `dali_compile.load` (quantized experts on the CPU), checks its tokens against its
dequantized reference, and prints the command line that runs it (`python -m dali_compile run ...`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from tqdm import tqdm

import dali_compile
from dali_compile.hf_compat import cache_keyword
from dali_compile.tiny_models import FAMILIES, tiny_model

# Big enough that the experts dominate the time, small enough to build in a second on 2 cores.
DEMO_SIZE = dict(hidden_size=256, num_hidden_layers=4, vocab_size=512)


@torch.no_grad()
def greedy_decode(forward, model, prompt: torch.Tensor, new_tokens: int, desc: str) -> tuple[list[int], float]:
    """Greedy generation with a DynamicCache; returns tokens and decode tokens/s (prefill excluded)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    logits = forward(input_ids=prompt, **{keyword: cache}, use_cache=True).logits
    tokens = []
    start = time.perf_counter()
    for _ in tqdm(range(new_tokens), desc=desc, unit="tok", leave=False, file=sys.stdout):
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        logits = forward(input_ids=token, **{keyword: cache}, use_cache=True).logits
    return tokens, new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="mixtral", choices=sorted(FAMILIES))
    parser.add_argument("--tokens", type=int, default=32, help="new tokens to generate")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--no-inductor", action="store_true", help="run the rewritten graph without inductor")
    parser.add_argument("--no-offload", action="store_true", help="skip part 2 (offload)")
    parser.add_argument("--policy", default="dali", help="offload policy (part 2)")
    parser.add_argument("--expert-fraction", type=float, default=0.5,
                        help="share of all experts the device budget holds (part 2)")
    parser.add_argument("--checkpoint", default=None,
                        help="directory to write the checkpoint of part 3 to and keep (default: a temporary one)")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip part 3 (checkpoint and load)")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.prompt_length < 1:
        parser.error("--tokens and --prompt-length must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = {**DEMO_SIZE, "intermediate_size": 512} if args.family == "mixtral" else DEMO_SIZE
    model = tiny_model(args.family, dtype, **size)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length),
                           generator=torch.Generator().manual_seed(0))
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"model: tiny {args.family}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({experts / 1e6:.1f}M in experts), {args.dtype}, {torch.get_num_threads()} CPU threads")

    compiled = torch.compile(model.forward, backend="dali", options={"inductor": not args.no_inductor})
    print(f"compiling with backend='dali' ({'plain FX graph' if args.no_inductor else 'inductor'}); "
          "the first calls compile the prefill and decode graphs...")
    greedy_decode(compiled, model, prompt, 2, desc="warm-up")  # compile outside the timed run

    eager_tokens, eager_speed = greedy_decode(model.forward, model, prompt, args.tokens, desc="eager")
    dali_tokens, dali_speed = greedy_decode(compiled, model, prompt, args.tokens, desc="dali ")

    print("\nrewrite report:")
    for report in dali_compile.reports():
        print(report)
    same = eager_tokens == dali_tokens
    print(f"\ngenerated {args.tokens} tokens: eager {eager_speed:.1f} tok/s, dali {dali_speed:.1f} tok/s "
          f"(ratio {dali_speed / eager_speed:.2f}); tokens identical: {same}")
    print(f"dali tokens: {dali_tokens[:16]}{' ...' if len(dali_tokens) > 16 else ''}")
    ok = same or dtype != torch.float32
    if not args.no_checkpoint:  # before part 2, which leaves the model offloaded
        ok = checkpoint_part(args, model, prompt) and ok
    if not args.no_offload:
        ok = offload_part(args, model, prompt, eager_tokens) and ok
    return 0 if ok else 1


def checkpoint_part(args, model, prompt) -> bool:
    """Part 3: the model to a checkpoint on disk and back through `dali_compile.load`, quantized on the way."""
    import shutil
    import tempfile
    from pathlib import Path

    from dali_compile.tiny_models import save_checkpoint

    keep = args.checkpoint is not None
    directory = Path(args.checkpoint) if keep else Path(tempfile.mkdtemp(prefix="dali-demo-"))
    save_checkpoint(model, directory, max_shard_size="1MB")
    files = sorted(directory.glob("*.safetensors"))
    print(f"\ncheckpoint: {len(files)} safetensors shards in {directory}; loading it back with int8 experts "
          "(dali_compile.load, quantized while read)...")
    quantize = {"experts": "int8"}
    loaded = dali_compile.load(directory, device="cpu", quantize=quantize, progress=False)
    reference = dali_compile.quantize(_copy_of(model, directory), **quantize)  # quantized after loading
    reference.set_experts_implementation("dali")
    tokens, speed = greedy_decode(loaded.forward, loaded, prompt, args.tokens, desc="loaded")
    want, _ = greedy_decode(reference.forward, reference, prompt, args.tokens, desc="reference")
    summary = dali_compile.load_summary(loaded)
    same = tokens == want
    print(f"loaded in {summary.seconds:.1f} s, {summary.host_bytes / 1e6:.1f} MB of weights (int8 experts); "
          f"{speed:.1f} tok/s eager; tokens identical to quantize-after-load: {same}")
    if keep:
        print(f"the command line on it: python -m dali_compile run --model {directory} --prompt 'To be'")
    else:
        shutil.rmtree(directory)
        print("(pass --checkpoint DIR to keep the checkpoint, then: python -m dali_compile run --model DIR "
              "--prompt 'To be')")
    return same


def _copy_of(model, directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype).eval()


def offload_part(args, model, prompt, eager_tokens: list[int]) -> bool:
    from dali_compile.experts_interface import spec_of_module
    from dali_compile.offload import experts_modules, runtime_of
    from dali_compile.runtime.expert_cache import expert_bytes

    device = "cuda" if torch.cuda.is_available() else "emulated"
    experts = [module for _, module in experts_modules(model)]
    slot_bytes = expert_bytes(spec_of_module(experts[0]))
    total = len(experts) * experts[0].num_experts
    budget = int((args.expert_fraction * total + model.config.num_experts_per_tok) * slot_bytes)
    note = " (CPU test double: timings mean nothing, counters do)" if device == "emulated" else ""
    print(f"\noffload: {device}{note}, policy {args.policy!r}, budget {budget / 1e6:.1f} MB = "
          f"{args.expert_fraction:.0%} of {total} experts "
          f"+ staging; profiling the cost model on first use...")
    dali_compile.offload(model, device=device, expert_memory=budget, policy=args.policy)
    runtime = runtime_of(model)
    compiled = torch.compile(model.forward, backend="dali", options={"inductor": not args.no_inductor})
    greedy_decode(compiled, model, prompt.to(runtime.accelerator.device), 2, desc="warm-up")
    runtime.reset_stats()
    tokens, speed = greedy_decode(compiled, model, prompt.to(runtime.accelerator.device), args.tokens,
                                  desc="offloaded")
    same = tokens == eager_tokens
    print(f"offloaded: {speed:.1f} tok/s; tokens identical to eager: {same}")
    print(runtime.stats_table())
    dali_compile.release(model)
    return same or model.dtype != torch.float32


if __name__ == "__main__":
    raise SystemExit(main())

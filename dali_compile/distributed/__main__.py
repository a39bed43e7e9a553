"""Run the distributed mode on a built-in tiny model or a local checkpoint; start it with torchrun:

    torchrun --nproc-per-node 4 -m dali_compile.distributed --model tiny:qwen3_moe --groups 2 --predictor shadow

Rank 0 generates greedily and prints the tokens, decode tokens/s and the job's statistics; with --check it
first generates with the model alone (all experts local) and exits 1 if the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import PREDICTORS, SHADOW_PRECISIONS, WORKER_DEVICES, load_for_rank, serve
from .shadow import SPECULATIVE_CANDIDATES

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(spec: str, dtype: torch.dtype, layers: int, hidden: int, seed: int, groups: int, predictor: str):
    """`tiny:FAMILY` (random weights from `seed`, the same on every rank) or a local checkpoint directory, read as
    this rank needs it (a worker reads only its own layers' experts)."""
    if spec.startswith("tiny:"):
        from dali_compile.tiny_models import tiny_model

        return tiny_model(spec[5:], dtype=dtype, seed=seed, num_hidden_layers=layers, hidden_size=hidden,
                          vocab_size=256)
    return load_for_rank(spec, groups=groups, predictor=predictor, dtype=dtype)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist(), new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:qwen3_moe", help="tiny:FAMILY or a checkpoint directory")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--layers", type=int, default=4, help="layers of a tiny model")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of a tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="checked against the number of processes")
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--predictor", default="shadow", choices=PREDICTORS)
    parser.add_argument("--shadow-precision", default="bf16", choices=SHADOW_PRECISIONS)
    parser.add_argument("--no-realign", action="store_true", help="the shadow runs on its own tokens and cache")
    parser.add_argument("--lookahead", type=int, default=0,
                        help="MoE layers of the next step the shadow speculates from its own token")
    parser.add_argument("--speculative-tokens", type=int, default=SPECULATIVE_CANDIDATES,
                        help="the shadow's most likely next tokens it speculates from (their experts' union)")
    parser.add_argument("--worker-device", default="emulated", choices=WORKER_DEVICES)
    parser.add_argument("--worker-memory", default=None, help="each worker's expert budget, e.g. 4MiB")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a silent worker is dropped")
    parser.add_argument("--rendezvous-timeout", type=float, default=120.0, help="seconds to wait for every rank")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--compile", action="store_true", help='the main rank runs torch.compile(backend="dali")')
    parser.add_argument("--check", action="store_true", help="compare the tokens with the model alone")
    parser.add_argument("--json", default=None, help="rank 0 writes tokens and statistics here")
    args = parser.parse_args(argv)

    model = build_model(args.model, _DTYPES[args.dtype], args.layers, args.hidden, args.seed, args.groups,
                        args.predictor)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length), generator=generator)
    reference = generate(model, prompt, args.max_new_tokens)[0] if args.check and _rank() == 0 else None
    session = serve(model, groups=args.groups, predictor=args.predictor, workers=args.workers,
                    shadow_precision=args.shadow_precision, realign=not args.no_realign, lookahead=args.lookahead,
                    speculative_tokens=args.speculative_tokens,
                    worker_device=args.worker_device, worker_memory=args.worker_memory, timeout_s=args.timeout,
                    rendezvous_timeout_s=args.rendezvous_timeout)
    if not session.is_main:
        return 0
    if args.compile:
        model.forward = torch.compile(model.forward, backend="dali")
    prefill_rate = generate(model, prompt, 1)[1]  # also the warm-up: lazy initialisation, compilation
    tokens, rate = generate(model, prompt, args.max_new_tokens)
    stats = session.close()
    # decode alone: the whole generation less a prefill-and-one-token run
    decode_s = args.max_new_tokens / rate - 1 / prefill_rate
    decode_rate = (args.max_new_tokens - 1) / decode_s if args.max_new_tokens > 1 and decode_s > 0 else None
    print(f"tokens: {tokens}")
    decode = "n/a" if decode_rate is None else f"{decode_rate:.1f}"
    print(f"{rate:.1f} tokens/s with prefill, decode {decode} tokens/s; {stats['topology']}")
    recall = "n/a" if stats["recall"] is None else f"{stats['recall']:.1%}"
    print(f"predictor {stats['predictor']}: recall {recall}, prefetch hits {stats['prefetch_hits']}, copies "
          f"{stats['copies']}; bytes sent {stats['bytes_sent']}, received {stats['bytes_received']}; pairs remote "
          f"{stats['remote_pairs']}, local {stats['local_pairs']}; lost workers {sorted(stats['lost_workers'])}")
    same = reference is None or reference == tokens
    if reference is not None:
        print("tokens equal the model alone" if same else f"TOKENS DIFFER from the model alone: {reference}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=tokens, reference=reference, stats=stats, rate=rate, decode_rate=decode_rate,
                           steps=stats["steps"]), f)
    return 0 if same else 1


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())

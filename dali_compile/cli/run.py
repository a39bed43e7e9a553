"""`run`: generate from a prompt (text, a file, token ids) or chat, streaming tokens to stdout, then one
summary line on stderr (stdout keeps only the text, so `> file` saves just that)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .measures import ExpertCounts, summary_line
from .options import CliError, HelpFormatter, add_common_options, load_model, model_device, positive_or_zero
from .streaming import IdPrinter, Sampler, TextPrinter, Timing, generate
from .tokenizer import load_text

# Without compiling, a short forward is enough to take the one-time costs (the cost model's profile on first
# use, the CPU runtime's first calls) out of the measured run; compiled, the prompt's own shape is needed.
EAGER_WARMUP_TOKENS = 8
# Decode steps see a longer cache each time: dynamo compiles the first length, recompiles once for a dynamic
# one at the second; the third runs the graph the measured steps will run.
WARMUP_NEW_TOKENS = 4


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="generate from a prompt or chat, streaming tokens",
                                   description=__doc__, formatter_class=HelpFormatter)
    add_common_options(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt")
    source.add_argument("--prompt-file", type=Path, metavar="FILE", help="read the prompt from a file")
    source.add_argument("--prompt-ids", type=token_ids, metavar="IDS",
                        help="the prompt as token ids, e.g. 1,2,3 (no tokenizer needed; output printed as ids)")
    source.add_argument("--chat", action="store_true",
                        help="chat: one user turn per stdin line (the chat template when the tokenizer has one); "
                             "an empty line or end of input ends")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampling, seeded")
    parser.add_argument("--top-k", type=positive_or_zero, default=0, metavar="K",
                        help="sample among the K best; 0: all")
    parser.set_defaults(command=run)


def token_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected at least one token id, none negative, got {text!r}")
    return ids


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    text = None if args.prompt_ids is not None else load_text(args.model)  # a tokenizer error before the load
    model, summary = load_model(args)
    sampler = Sampler(args.temperature, args.top_k, args.seed)
    if args.chat:
        timing, experts = chat(model, text, sampler, args)
    else:
        timing, experts = complete(model, text, prompt, sampler, args)
    print(summary_line(timing, experts, model, summary.device), file=sys.stderr, flush=True)
    return 0


def complete(model, text, prompt: str | None, sampler, args) -> tuple[Timing, ExpertCounts | None]:
    """The prompt (echoed as text; not echoed as ids) and its continuation, token by token."""
    ids = args.prompt_ids if text is None else text.encode(prompt)
    check_ids(ids, model, args)
    device = model_device(model)
    warm_up(model, ids, args.compile, device)
    before = ExpertCounts.read(model)
    if text is None:
        printer = IdPrinter()
    else:
        sys.stdout.write(prompt)
        printer = TextPrinter(text)
    _, timing = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, sampler,
                         stop_ids_of(model, text), printer)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return timing, None if before is None else ExpertCounts.read(model).since(before)


def read_prompt(args) -> str | None:
    if args.prompt_file is None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"--prompt-file {args.prompt_file}: {getattr(error, 'strerror', None) or error}") from None


def stop_ids_of(model, text) -> set[int]:
    """Where a sequence ends: the generation config's end-of-sequence ids, as the tokenizer sees them."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}
    return configured if text is None else text.stop_ids(configured)


def check_ids(ids: list[int], model, args) -> None:
    vocabulary = model.config.vocab_size
    if not ids:
        raise CliError("the prompt is empty")
    if max(ids) >= vocabulary:
        raise CliError(f"token id {max(ids)} is outside the model's vocabulary of {vocabulary}")
    if len(ids) + args.max_new_tokens > args.context_length:
        raise CliError(f"{len(ids)} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed --context-length "
                       f"{args.context_length}")


def warm_up(model, ids: list[int], compiled: bool, device) -> None:
    """One short generation, discarded: compiling (the prompt's shape and the decode step's) and first-use
    costs stay out of the figures."""
    if compiled:
        print("compiling (warm-up run)...", file=sys.stderr, flush=True)
    ids = ids if compiled else ids[:EAGER_WARMUP_TOKENS]
    generate(model, torch.tensor([ids], device=device), WARMUP_NEW_TOKENS)


def chat(model, text, sampler, args) -> tuple[Timing, ExpertCounts | None]:
    """Turns from stdin until an empty line or end of input; the whole conversation is the next prompt."""
    device, stop_ids = model_device(model), stop_ids_of(model, text)
    warm_up(model, text.chat_ids([{"role": "user", "content": "Hello"}]), args.compile, device)
    messages, timing, before = [], Timing(), ExpertCounts.read(model)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = text.chat_ids(messages)
        check_ids(ids, model, args)
        reply, turn = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, sampler, stop_ids,
                               TextPrinter(text))
        sys.stdout.write("\n")
        sys.stdout.flush()
        timing.add(turn)
        messages.append({"role": "assistant", "content": text.decode(reply[0])})
    return timing, None if before is None else ExpertCounts.read(model).since(before)

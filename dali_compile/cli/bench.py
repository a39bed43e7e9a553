"""`bench`: prefill and decode tokens/s over prompt lengths and batch sizes, for several policies side by side.

The model is loaded once; on an offloaded device (emulated, cuda) each further policy re-offloads it
(`release`, then `offload` with the same expert budget). On the CPU every expert runs on the CPU and the
policy does not apply: one set of rows. Each case runs once to warm up (compiling its shapes), then
--repeats times; the median is reported, with the expert hit rate and CPU share over the measured runs.
Prompts are random token ids (seeded), so no tokenizer is needed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

from ..offload import offload, release
from ..runtime.policies import POLICIES
from .measures import ExpertCounts, is_offloaded
from .options import CliError, HelpFormatter, add_common_options, compile_forward, load_model, model_device, positive
from .streaming import generate

COLUMNS = ("policy", "batch_size", "prompt_length", "new_tokens", "prefill_tok_s", "decode_tok_s", "expert_hit_rate",
           "expert_cpu_share", "device", "dtype", "quantize", "compiled", "repeats")
NOT_OFFLOADED = "none"  # the policy column on the CPU, where no policy places experts


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="prefill and decode tokens/s per prompt length, batch size and policy",
                                   description=__doc__, formatter_class=HelpFormatter)
    add_common_options(parser)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), metavar="POLICY",
                        help="policies side by side; default: --policy and the all_cpu baseline")
    parser.add_argument("--prompt-lengths", nargs="+", type=positive, default=[16, 128], metavar="T",
                        help="prompt tokens per sequence (random ids)")
    parser.add_argument("--batch-sizes", nargs="+", type=positive, default=[1, 4], metavar="B",
                        help="sequences decoded together")
    parser.add_argument("--repeats", type=positive, default=3, help="measured runs per case (after one warm-up)")
    parser.add_argument("--csv", type=Path, metavar="PATH", help="default: dali_bench_<model>_<device>.csv here")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="default: the CSV's name with .png")
    parser.set_defaults(command=bench, max_new_tokens=32)


def bench(args: argparse.Namespace) -> int:
    longest = max(args.prompt_lengths) + args.max_new_tokens
    if longest > args.context_length:
        raise CliError(f"the longest case needs {longest} tokens, more than --context-length {args.context_length}")
    policies = args.policies or list(dict.fromkeys([args.policy, "all_cpu"]))
    csv_path = args.csv or Path(f"dali_bench_{Path(args.model).name}_{args.device.replace(':', '')}.csv")
    plot_path = args.plot or csv_path.with_suffix(".png")
    args.policy = policies[0]
    model, summary = load_model(args)
    if not is_offloaded(model):
        print("device cpu: every expert runs on the CPU, the policies do not apply", file=sys.stderr)
        policies = [NOT_OFFLOADED]
    elif args.device.startswith("emulated"):
        print("device emulated: a CPU test double of a GPU; its hit rates and CPU/GPU splits mean something, "
              "its tokens/s do not (its 'GPU' experts run a Python reference)", file=sys.stderr)
    rows = []
    for index, policy in enumerate(policies):
        if index:
            reoffload(model, args, summary.expert_memory, policy)
        for batch in args.batch_sizes:
            for length in args.prompt_lengths:
                row = measure(model, args, batch, length)
                row.update(policy=policy, device=args.device, dtype=str(summary.dtype).removeprefix("torch."),
                           quantize=quantize_text(summary.quantize), compiled=args.compile, repeats=args.repeats)
                print(f"{policy}: batch {batch}, prompt {length}: prefill {row['prefill_tok_s']} tok/s, "
                      f"decode {row['decode_tok_s']} tok/s", file=sys.stderr, flush=True)
                rows.append(row)
    print(side_by_side(rows, policies))
    write_csv(rows, csv_path)
    print(f"csv: {csv_path}")
    print(f"plot: {plot(rows, plot_path)}")
    return 0


def reoffload(model, args, expert_memory: int, policy: str) -> None:
    """The same model and budget under another policy; a compiled forward is compiled again (its graphs name the
    released layers' handles)."""
    release(model)
    offload(model, device=args.device, expert_memory=expert_memory, policy=policy)
    if args.compile:
        torch._dynamo.reset()
        compile_forward(model)


def measure(model, args, batch: int, length: int) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    prompt = prompt.to(model_device(model))
    generate(model, prompt, args.max_new_tokens)  # warm-up: compiles this case's shapes, fills the caches
    before = ExpertCounts.read(model)
    timings = [generate(model, prompt, args.max_new_tokens)[1] for _ in range(args.repeats)]
    experts = None if before is None else ExpertCounts.read(model).since(before)
    return dict(batch_size=batch, prompt_length=length, new_tokens=args.max_new_tokens,
                prefill_tok_s=median([t.prefill_rate for t in timings]),
                decode_tok_s=median([t.decode_rate for t in timings]),
                expert_hit_rate=_rounded(None if experts is None else experts.hit_rate),
                expert_cpu_share=_rounded(1.0 if experts is None else experts.cpu_share))


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 2) if values else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def quantize_text(quantize: dict | None) -> str:
    return "none" if not quantize else ",".join(f"{k}={v}" for k, v in quantize.items() if v)


def side_by_side(rows: list[dict], policies: list[str]) -> str:
    """One line per (batch, prompt length); prefill and decode tokens/s of each policy next to each other."""
    header = ["batch", "prompt"] + [f"{p} {what} tok/s" for p in policies for what in ("prefill", "decode")]
    by_case = {}
    for row in rows:
        by_case.setdefault((row["batch_size"], row["prompt_length"]), {})[row["policy"]] = row
    lines = [header]
    for (batch, length), per_policy in by_case.items():
        cells = [str(batch), str(length)]
        for policy in policies:
            row = per_policy.get(policy, {})
            cells += [_cell(row.get("prefill_tok_s")), _cell(row.get("decode_tok_s"))]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)) for line in lines)


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> str:
    """Tokens/s against prompt length, prefill and decode side by side, one line per policy and batch size.
    Returns the path written, or why nothing was."""
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = {}
    for row in rows:
        series.setdefault((row["policy"], row["batch_size"]), []).append(row)
    for axis, key, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for (policy, batch), points in series.items():
            points = [p for p in points if p[key] is not None]
            axis.plot([p["prompt_length"] for p in points], [p[key] for p in points], marker="o",
                      label=f"{policy}, batch {batch}")
        axis.set(title=f"{title} tokens/s", xlabel="prompt length (tokens)", ylabel="tokens/s", xscale="log")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return str(path)

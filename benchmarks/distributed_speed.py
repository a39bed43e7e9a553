"""Section 2 of bench_distributed.py: decode speed of the distributed mode (torchrun, gloo over loopback,
emulated workers on this machine; NCCL and CUDA workers on a GPU machine) beside one process with every
expert resident and the single-node dali policy at the same total expert memory (the workers' budgets
summed), with the bytes moved per model step, the recall that arrived in time, and the copies.

Each distributed run is the real command (`python -m dali_compile.distributed ... --check --json`), its
tokens checked against the model alone. Every rank runs one thread (torchrun's OMP_NUM_THREADS=1) and the
single-process paths are timed with one thread too. On a CPU-only machine the emulated device's copies and
compute are the CPU's own: the ratios say what the messages, the extra processes and the Python around them
cost here, not what a cluster of GPUs would do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SPEED_CONFIGS = [  # (label, processes, extra arguments of python -m dali_compile.distributed)
    ("distributed 2w/2g shadow-bf16", 4, ["--groups", "2", "--predictor", "shadow"]),
    ("distributed 2w/2g shadow-bf16 no-realign", 4, ["--groups", "2", "--predictor", "shadow", "--no-realign"]),
    ("distributed 2w/2g residual", 3, ["--groups", "2", "--predictor", "residual"]),
    ("distributed 2w/2g none", 3, ["--groups", "2", "--predictor", "none"]),
    # the emulated device computes with the Python reference: CPU-runtime workers show the messages' own cost
    ("distributed 2w/2g none, CPU-runtime workers", 3, ["--groups", "2", "--predictor", "none", "--worker-device",
                                                         "cpu"]),
]


def add_arguments(parser) -> None:
    parser.add_argument("--speed-model", default="tiny:qwen3_moe", help="section 2's model (tiny:FAMILY or a path)")
    parser.add_argument("--speed-layers", type=int, default=4)
    parser.add_argument("--speed-hidden", type=int, default=256)
    parser.add_argument("--speed-tokens", type=int, default=16, help="section 2's new tokens per run")


def print_table(rows: list[dict]) -> None:
    print("\ndecode speed (section 2)")
    print(f"{'path':48s} {'tok/s':>7s} {'vs resident':>11s} {'bytes/step':>10s} {'recall':>7s} {'copies/step':>11s} "
          "tokens")
    for row in rows:
        recall = "-" if row["recall"] is None else f"{row['recall']:.1%}"
        copies = "-" if row["copies_per_step"] is None else f"{row['copies_per_step']:.1f}"
        tokens = "equal" if row["tokens_equal"] else "DIFFER"
        print(f"{row['path']:48s} {row['decode_tokens_s']:7.2f} {row['vs_all_resident']:10.2f}x "
              f"{row['bytes_per_step']:10.0f} {recall:>7s} {copies:>11s} {tokens}")


def _model_arguments(args) -> list[str]:
    return ["--model", args.speed_model, "--layers", str(args.speed_layers), "--hidden", str(args.speed_hidden),
            "--prompt-length", str(args.prompt_length), "--max-new-tokens", str(args.speed_tokens)]


def _distributed_run(processes: int, arguments: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "-m", "dali_compile.distributed", *arguments, "--check", "--json", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


@torch.no_grad()
def _single_process_rates(args, budget_bytes: int) -> dict[str, float]:
    """Decode tokens/s of the model alone (all experts resident) and of the single-node dali policy offloaded to
    the emulated device with `budget_bytes` of expert memory, as the command measures them."""
    import dali_compile
    from dali_compile.distributed.__main__ import build_model, generate

    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    rates = {}
    for label in ("all experts resident (1 process)", "single-node dali, same expert memory (emulated)"):
        model = build_model(args.speed_model, torch.float32, args.speed_layers, args.speed_hidden, 0)
        if label.startswith("single-node"):
            dali_compile.offload(model, device="emulated", expert_memory=budget_bytes, policy="dali")
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_length),
                               generator=torch.Generator().manual_seed(0))
        first = generate(model, prompt, 1)[1]
        _, rate = generate(model, prompt, args.speed_tokens)
        rates[label] = (args.speed_tokens - 1) / (args.speed_tokens / rate - 1 / first)
    return rates


def speed_section(args) -> list[dict]:
    """One row per path (see the module docstring)."""
    rows = []
    budget = None
    for label, processes, extra in SPEED_CONFIGS:
        result = _distributed_run(processes, _model_arguments(args) + extra)
        stats = result["stats"]
        if budget is None and "cpu" not in extra:
            budget = sum(w["budget_bytes"] for w in stats["workers"].values())
        moved = stats["bytes_sent"] + stats["bytes_received"] + stats["shadow_bytes"]
        rows.append(dict(path=label, decode_tokens_s=result["decode_rate"], tokens_equal=result["tokens"] ==
                         result["reference"], bytes_per_step=moved / max(result["steps"], 1),
                         recall=stats["recall"], copies_per_step=stats["copies"] / max(result["steps"], 1)))
    for label, rate in _single_process_rates(args, budget).items():
        rows.append(dict(path=label, decode_tokens_s=rate, tokens_equal=True, bytes_per_step=0.0, recall=None,
                         copies_per_step=None))
    resident = rows[-2]["decode_tokens_s"]
    for row in rows:
        row["vs_all_resident"] = row["decode_tokens_s"] / resident if row["decode_tokens_s"] else None
    return rows

"""Coverage sweep: every in-tree transformers family with the fused experts module, rewritten by dali?

    python benchmarks/coverage_families.py [family ...] [--csv coverage.csv]

For each model family whose modeling file uses `use_experts_implementation`, build
a tiny random-weight model from its config with generic toy sizes, run it eagerly
and through `torch.compile(backend="dali", options={"inductor": False})`, and
print: MoE layers rewritten / present, the relative logit error, the layout found
or the refusal reason. Families whose config cannot be built from the generic
sizes (multimodal wrappers, strict validators) or whose eager forward already
fails with them are listed as skipped with the reason: those say nothing about dali.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import warnings

import torch

TOY_SIZES = dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=96, num_experts=8, num_local_experts=8, n_routed_experts=8,
    num_experts_per_tok=2, head_dim=8, max_position_embeddings=128, n_group=2, topk_group=1,
    first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
    qk_nope_head_dim=8, shared_expert_intermediate_size=40, moe_num_experts=8, moe_k=2, num_shared_experts=1,
    n_shared_experts=1,
)


def fused_experts_families() -> list[str]:
    import transformers

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    return sorted({
        os.path.basename(os.path.dirname(path)) for path in glob.glob(f"{root}/*/modeling_*.py")
        if "use_experts_implementation" in open(path).read()
    })


def check_family(family: str) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    import dali_compile

    row = dict(family=family, status="skipped", rewritten="", moe_layers="", error="", detail="")
    try:
        config_class = transformers.CONFIG_MAPPING[family]
        if "text_config" in getattr(config_class, "sub_configs", {}):
            # multimodal wrapper: the MoE lives in the text model; its defaults are full size, so shrink that
            config = config_class(text_config=dict(TOY_SIZES)).text_config
        else:
            config = config_class(**TOY_SIZES)
        config.initializer_range = 0.2
        config._experts_implementation = "grouped_mm"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        ids = torch.randint(0, 96, (1, 6))
        with torch.no_grad():
            want = model(ids).logits
    except Exception as error:  # a config or eager failure, not dali's
        row["detail"] = f"toy model not buildable: {type(error).__name__}: {str(error)[:90]}"
        return row
    torch._dynamo.reset()
    dali_compile.clear_reports()
    with torch.no_grad():
        got = torch.compile(model, backend="dali", options={"inductor": False})(ids).logits
    reports = dali_compile.reports()
    moe_layers = sum(
        1 for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Parameter)
        and m.down_proj.dim() == 3
    )
    rewritten = sum(r.num_rewritten for r in reports)
    error = float((got - want).abs().max() / want.abs().max())
    refused = [f"{r.scope}: {r.reason}" for report in reports for r in report.refused]
    layouts = sorted({r.layout for report in reports for r in report.rewritten})
    row.update(
        status="ok" if rewritten == moe_layers and error < 1e-4 else "NOT REWRITTEN",
        rewritten=rewritten, moe_layers=moe_layers, error=f"{error:.1e}",
        detail="; ".join(layouts) if not refused else refused[0],
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", help="families to check (default: all with fused experts)")
    parser.add_argument("--csv", default="coverage_families.csv")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = []
    for family in args.families or fused_experts_families():
        row = check_family(family)
        rows.append(row)
        counts = f"{row['rewritten']}/{row['moe_layers']}" if row["moe_layers"] != "" else ""
        print(f"{row['family']:26s} {row['status']:13s} {counts:5s} {row['error']:8s} {row['detail']}", flush=True)
    ok = sum(r["status"] == "ok" for r in rows)
    bad = sum(r["status"] == "NOT REWRITTEN" for r in rows)
    print(f"\n{ok} rewritten and equal to eager, {bad} not rewritten, {len(rows) - ok - bad} toy model not buildable")
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

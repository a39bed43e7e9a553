"""The profiled breakdown of a decode step (bench_decode.py): where the time of one step goes, by op category.

Top-level ops of each profiled step (operators or inductor kernels with no operator above; annotations such
as "Torch-Compiled Region" are seen through) grouped as experts (dali::moe_hybrid, dali::cpu_experts*), dense
(dali::cpu_linear, dali::quantized_linear, aten::mm, addmm, linear, matmul, bmm), attention
(scaled_dot_product, attention or softmax in the name: the router's softmax too) and other; overhead = the
step's wall time minus all top-level ops (Python, dynamo's guards, graph glue, the profiler's own cost).
"""

from __future__ import annotations

import torch

BREAKDOWN = ("experts", "dense", "attention", "other", "overhead")
DENSE_OPS = ("dali::cpu_linear", "dali::quantized_linear", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul",
             "aten::bmm")


def category(name: str) -> str:
    if name.startswith(("dali::moe_hybrid", "dali::cpu_experts")):
        return "experts"
    if name in DENSE_OPS:
        return "dense"
    if any(word in name for word in ("scaled_dot_product", "attention", "softmax")):
        return "attention"
    return "other"


def is_op(name: str) -> bool:
    """An operator or an inductor kernel, not a record_function annotation."""
    return "::" in name or "cpp_fused" in name


STEP_MARK = "bench_decode_step"


def top_level_in_step(event) -> bool:
    """An op inside a profiled step with no op above it (annotations such as dynamo's are seen through)."""
    parent = event.cpu_parent
    while parent is not None and parent.name != STEP_MARK:
        if is_op(parent.name):
            return False
        parent = parent.cpu_parent
    return parent is not None and is_op(event.name)


def breakdown(call, steps: int) -> dict[str, float]:
    """ms per step of each BREAKDOWN part and of the profiled step, from one profiled run of `steps` steps of
    `call` (call.step() the step, call.reset() untimed after it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function(STEP_MARK):
                call.step()
            call.reset()
    parts = dict.fromkeys(BREAKDOWN, 0.0)
    for event in prof.events():
        if top_level_in_step(event):
            parts[category(event.name)] += event.cpu_time_total
    wall = sum(e.cpu_time_total for e in prof.events() if e.name == STEP_MARK)
    parts["overhead"] = wall - sum(parts.values())
    return {**{f"{k}_ms": v / 1e3 / steps for k, v in parts.items()}, "profiled_ms": wall / 1e3 / steps}
